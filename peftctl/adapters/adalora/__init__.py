"""AdaLoRA (Zhang et al. 2023): config in `config` (no torch), layers, rank allocator and training hooks in `layer`."""
