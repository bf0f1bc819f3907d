"""Checkpoint loading and the encoder written once over plaintext and MPC backends."""
