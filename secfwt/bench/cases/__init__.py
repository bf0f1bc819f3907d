"""The sub-benchmarks of ``secfwt bench``, one module per family of cases.

Each module builds its inputs and plaintext reference, runs its cases through
:class:`secfwt.bench.runner.Runner` and returns its section of the report;
:func:`secfwt.bench.suite.run_suite` calls them in suite order. :mod:`.layer` is the one-layer
case that ``forward``, ``vanilla`` and ``transport`` share.
"""
