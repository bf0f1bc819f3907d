"""Party daemons: gRPC services with mutual TLS behind ``secfwt party``, ``secfwt job``,
``secfwt certs``.

- :mod:`certs` deployment CA and certificates; :mod:`identity` what a certificate says who it is
- :mod:`config` typed party.toml / client.toml
- :mod:`protocol` domain types; :mod:`party` one party's side of the protocol (no gRPC), made
  of :mod:`access` who may call, :mod:`negotiation` proposals and acceptance,
  :mod:`execution` the queue and worker, :mod:`journal` job records and events,
  :mod:`retention` how many unaccepted jobs a caller may leave and how long jobs are kept;
  :mod:`jobfile` reading a job file; :mod:`store` job state on disk; :mod:`holdings`
  commitments; :mod:`runner` the JobRunner hook
- :mod:`service` the thin servicer and its guard; :mod:`convert` proto <-> domain;
  :mod:`errors` errors -> gRPC status codes; :mod:`daemon` server, TLS, signals; :mod:`client`
- :mod:`cli` the command-line wiring; :mod:`logs` JSON-lines logs
"""
