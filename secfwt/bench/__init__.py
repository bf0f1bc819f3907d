"""Benchmark suite (``secfwt bench``): what MPC costs, measured with real party processes.

:mod:`~secfwt.bench.suite` runs the sub-benchmarks a :mod:`~secfwt.bench.plan` names, each a
module of :mod:`~secfwt.bench.cases` whose cases :mod:`~secfwt.bench.runner` runs in party
processes; :mod:`~secfwt.bench.provenance` records the code and machine of a run.
:mod:`~secfwt.bench.party` is what each party executes, :mod:`~secfwt.bench.probe` measures
inside a party, :mod:`~secfwt.bench.metrics` holds the pure arithmetic (projections, growth
exponents, targets), :mod:`~secfwt.bench.vanilla` the vanilla CrypTen layer,
:mod:`~secfwt.bench.report` the JSON, Markdown and plots.
:mod:`~secfwt.bench.transport` measures the MPC transports alone (gloo and TLS throughput and
round trips, ``python -m secfwt.bench.transport``).
"""
