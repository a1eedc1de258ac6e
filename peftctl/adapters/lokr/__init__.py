"""LoKr (low-rank Kronecker product): config in `config` (no torch), layers in `layer`; what it
shares with LoHa is in `adapters/lycoris/`."""
