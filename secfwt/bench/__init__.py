"""Benchmark suite (``secfwt bench``): what MPC costs, measured with real party processes.

:mod:`~secfwt.bench.suite` runs sub-benchmarks, :mod:`~secfwt.bench.party` is what each party
executes, :mod:`~secfwt.bench.probe` measures inside a party, :mod:`~secfwt.bench.metrics`
holds the pure arithmetic (projections, growth exponents, targets), :mod:`~secfwt.bench.vanilla`
the vanilla CrypTen layer, :mod:`~secfwt.bench.report` the JSON, Markdown and plots.
:mod:`~secfwt.bench.transport` measures the MPC transports alone (gloo and TLS throughput and
round trips, ``python -m secfwt.bench.transport``).
"""
