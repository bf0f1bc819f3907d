"""A proposed job file, read the way a party daemon reads it: TOML, validated, TTP only.

Its own module because every reader must agree: the party when it checks a proposal, computes a
commitment or runs a job, and ``secfwt job submit`` before it proposes one. Every problem is an
:class:`InvalidRequestError`, so the daemon answers it as INVALID_ARGUMENT.
"""

from __future__ import annotations

import tomllib

from secfwt.config import JobConfig, parse_job, validate
from secfwt.errors import ConfigError
from secfwt.mpc.provider import Provider
from secfwt.server.errors import InvalidRequestError


def parse_job_text(text: str, *, where: str) -> JobConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError(f"{where}: the job file is not valid TOML: {exc}") from None
    try:
        cfg = parse_job(raw, where=where)
        validate(cfg)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc)) from None
    if cfg.job.provider is not Provider.TTP:
        raise InvalidRequestError(
            f"{where}: job.provider = {cfg.job.provider.value.lower()!r} lets the model owner "
            "learn the data owner's inputs; "
            "party daemons only run jobs with provider = 'ttp' (the dealer supplies randomness)"
        )
    return cfg
