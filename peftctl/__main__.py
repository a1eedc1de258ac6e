from peftctl.cli import main

main()
