"""Optional fast paths, each with plain-PyTorch code that runs everywhere."""
