"""party.toml and client.toml: typed, unknown keys rejected with their names, secure defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from secfwt.errors import ConfigError
from secfwt.roles import Role
from secfwt.server.config import load_client_config, load_party_config, parse_party_config

GOOD = """
[party]
id = "hospital-a"
role = "data-owner"
listen = "0.0.0.0:7401"
state_dir = "state"

[tls]
cert = "certs/hospital-a.crt"
key = "certs/hospital-a.key"
ca = "certs/ca.crt"

[[peers]]
id = "vendor"
role = "model_owner"
address = "vendor.example.org:7401"

[[operators]]
id = "alice"

[limits]
queue_size = 2

[jobs]
heartbeat_timeout_s = 5
checkpoint_every_steps = 20

[data]
source = "jsonl"
path = "data/train.jsonl"
"""


def test_good_config_resolves_paths_and_pins(tmp_path: Path) -> None:
    f = tmp_path / "party.toml"
    f.write_text(GOOD)
    cfg = load_party_config(f)
    assert cfg.party.role is Role.DATA_OWNER and not cfg.party.insecure
    assert cfg.tls.cert == str(tmp_path / "certs/hospital-a.crt") and cfg.party.state_dir == str(
        tmp_path / "state"
    )
    assert cfg.data is not None and cfg.data.path == str(tmp_path / "data/train.jsonl")
    assert {str(i) for i in cfg.pinned()} == {"model_owner/vendor", "operator/alice"}
    assert (
        cfg.limits.queue_size == 2
        and cfg.jobs.heartbeat_timeout_s == 5.0
        and cfg.jobs.checkpoint_every_steps == 20
    )
    # retention defaults: 16 unaccepted jobs per caller, removed after 7 days
    assert cfg.limits.max_proposals_per_caller == 16 and cfg.jobs.proposal_ttl_s == 7 * 86400


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("queue_size = 2", "queue_sise = 2"),
            "unknown key 'queue_sise'; valid keys: max_message_bytes",
        ),
        (("[limits]", "[limit]"), r"unknown section \[limit\]"),
        (
            ('cert = "certs/hospital-a.crt"\n', ""),
            r"\[tls\] cert missing: mutual TLS is the default",
        ),
        (('id = "hospital-a"', 'id = "Hospital A"'), "DNS label"),
        (('listen = "0.0.0.0:7401"', 'listen = "7401"'), "expected HOST:PORT"),
        (('role = "data-owner"', 'role = "dealer"'), r"\[data\] is for the data owner"),
        (('role = "data-owner"', 'role = "model_owner"'), r"a model owner needs \[model\] path"),
        (("queue_size = 2", "queue_size = 0"), "limits.queue_size = 0: must be > 0"),
        (("heartbeat_timeout_s = 5", 'heartbeat_timeout_s = "5"'), "expected a number"),
        (
            ("queue_size = 2", "max_proposals_per_caller = 0"),
            "limits.max_proposals_per_caller = 0: must be > 0",
        ),
        (
            ("heartbeat_timeout_s = 5", "proposal_ttl_s = 0"),
            "jobs.proposal_ttl_s = 0.0: must be > 0",
        ),
        (("heartbeat_timeout_s = 5", "proposal_ttl_s = nan"), "jobs.proposal_ttl_s = nan"),
        (("heartbeat_timeout_s = 5", "shutdown_grace_s = nan"), "jobs.shutdown_grace_s = nan"),
        (
            (
                'id = "vendor"',
                'id = "hospital-a"\nrole = "data_owner"\naddress = "x:1"\n[[peers]]\nid = "v"',
            ),
            "is listed twice or is this party itself",
        ),
    ],
)
def test_bad_configs_name_the_field(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    f = tmp_path / "party.toml"
    f.write_text(GOOD.replace(*edit, 1))
    with pytest.raises(ConfigError, match=message):
        load_party_config(f)


def test_insecure_config_needs_no_tls() -> None:
    raw = {"party": {"id": "d", "role": "dealer", "insecure": True}}
    cfg = parse_party_config(raw, where="x", base=Path("."))
    assert cfg.party.insecure and cfg.tls.cert == ""


def test_client_config(tmp_path: Path) -> None:
    f = tmp_path / "client.toml"
    f.write_text(
        '[client]\nid = "alice"\n[tls]\ncert = "a.crt"\nkey = "a.key"\nca = "ca.crt"\n'
        '[[parties]]\nid = "vendor"\nrole = "model_owner"\naddress = "h:1"\n'
    )
    cfg = load_client_config(f)
    assert cfg.party_at("h:1").identity.dns_name == "vendor.model-owner.secfwt"
    assert cfg.tls.key == str(tmp_path / "a.key")
    f.write_text('[client]\nname = "alice"\n')
    with pytest.raises(ConfigError, match="unknown key 'name'"):
        load_client_config(f)
