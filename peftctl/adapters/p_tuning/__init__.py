"""P-tuning (Liu et al. 2021): config in `config` (no torch), the encoder in `peftctl.adapters.prompt`."""
