"""secfwt: privacy-preserving multi-party forward-only fine-tuning of language models
(CrypTen MPC)."""

__version__ = "0.1.0"
