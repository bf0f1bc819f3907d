"""Packaged job files."""
