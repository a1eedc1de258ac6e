"""LoHa (low-rank Hadamard product): config in `config` (no torch), layers in `layer`; what it
shares with LoKr is in `adapters/lycoris/`."""
