"""Forward-only tuning: the ZO, DP-ZO and CMA-ES loops (:mod:`~secfwt.tuning.loops`) over
plaintext or secret-shared backends, their steps (SPSA/MeZO, DP-ZO, CMA-ES prompt search),
the DP accountant, the cached forward, trainable-parameter selection, the plaintext reference."""
