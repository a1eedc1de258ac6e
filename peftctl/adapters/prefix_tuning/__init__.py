"""Prefix tuning (Li & Liang 2021): config in `config` (no torch), the encoder in `peftctl.adapters.prompt`."""
