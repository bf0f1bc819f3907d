"""Benchmark suite (``secfwt bench``): what MPC costs, measured with real party processes.

:mod:`~secfwt.bench.suite` runs sub-benchmarks, :mod:`~secfwt.bench.party` is what each party
executes, :mod:`~secfwt.bench.probe` measures inside a party, :mod:`~secfwt.bench.metrics`
holds the pure arithmetic (projections, growth exponents, targets), :mod:`~secfwt.bench.vanilla`
the vanilla CrypTen layer, :mod:`~secfwt.bench.report` the JSON, Markdown and plots.
"""
