"""A proposed job file, read the way a party daemon reads it: TOML, validated, TTP only.

Its own module because every reader must agree: the party when it checks a proposal, computes a
commitment or runs a job, and ``secfwt job submit`` before it proposes one. Every problem of a
received text is an :class:`InvalidRequestError` (the daemon answers INVALID_ARGUMENT); of a
local file (:func:`read_job_file`) a :class:`ConfigError` (the CLI exits 2). Either is one line.
"""

from __future__ import annotations

from pathlib import Path

from secfwt.config import JobConfig, parse_job, validate
from secfwt.errors import ConfigError
from secfwt.mpc.provider import Provider
from secfwt.overrides import loads_toml, read_toml_text
from secfwt.server.errors import InvalidRequestError


def parse_job_text(text: str, *, where: str) -> JobConfig:
    try:
        cfg = parse_job(loads_toml(text, where=where), where=where)
        validate(cfg)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc)) from None
    except RecursionError:  # a value nested within the parser's depth, too deep to describe
        raise InvalidRequestError(
            f"{where}: the job file has values nested too deeply; a job file needs only a few "
            "levels"
        ) from None
    if cfg.job.provider is not Provider.TTP:
        raise InvalidRequestError(
            f"{where}: job.provider = {cfg.job.provider.value.lower()!r} lets the model owner "
            "learn the data owner's inputs; "
            "party daemons only run jobs with provider = 'ttp' (the dealer supplies randomness)"
        )
    return cfg


def read_job_file(path: Path) -> tuple[str, JobConfig]:
    """A local job file's text and its config, as a daemon will read it (``secfwt job submit``)."""
    text = read_toml_text(path, what="job file")
    try:
        return text, parse_job_text(text, where=str(path))
    except InvalidRequestError as exc:
        raise ConfigError(str(exc)) from None
