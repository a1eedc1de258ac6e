"""(IA)³: config in `config` (no torch), layers in `layer`."""
