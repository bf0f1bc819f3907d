"""Benchmark suite (`secfwt bench`): arrives with issue #4."""
