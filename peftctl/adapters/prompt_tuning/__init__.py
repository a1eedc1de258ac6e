"""Prompt tuning (Lester et al. 2021): config in `config` (no torch), the prompt embedding in `layer`."""
