"""Party daemons: gRPC services with mutual TLS behind ``secfwt party``, ``secfwt job``,
``secfwt certs``.

- :mod:`certs` deployment CA and certificates; :mod:`identity` what a certificate says who it is
- :mod:`config` typed party.toml / client.toml
- :mod:`protocol` domain types; :mod:`party` the job protocol and queue (no gRPC);
  :mod:`store` job state on disk; :mod:`holdings` commitments; :mod:`runner` the JobRunner hook
- :mod:`service` the thin servicer and its guard; :mod:`convert` proto <-> domain;
  :mod:`errors` errors -> gRPC status codes; :mod:`daemon` server, TLS, signals; :mod:`client`
- :mod:`cli` the command-line wiring; :mod:`logs` JSON-lines logs
"""
