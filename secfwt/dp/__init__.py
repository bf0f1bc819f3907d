"""Plaintext DP-SGD baseline (Opacus) and ``secfwt dp-compare``; the DP-ZO maths and the
accountant they share with the MPC job live in :mod:`secfwt.tuning`."""
