"""VeRA (Kopiczko et al. 2024): shared frozen random projections, two trained vectors per layer."""
