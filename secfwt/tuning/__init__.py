"""Forward-only tuners: SPSA/MeZO, CMA-ES prompt search, trainable-parameter selection."""
