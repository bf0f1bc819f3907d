"""Opacus DP-SGD baseline and DP accounting: arrive with issue #5."""
