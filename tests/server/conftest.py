"""A three-party deployment in a temp folder: CA, certificates, a model, a dataset, a job file.

Certificates come from :mod:`secfwt.pki.certs` (the code under test); daemons are real gRPC
servers on 127.0.0.1 with port 0 unless a test needs two daemons to know each other's address
in advance (then :func:`free_port`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from secfwt.pki import certs
from secfwt.pki.identity import Identity, IdentityRole

IDS = {"model_owner": "vendor", "data_owner": "hospital", "dealer": "dealer"}
OPERATOR = "alice"

JOB_TOML = """
[job]
name = "daemon-test"
seed = 0

[model]
max_length = 16

[data]
shots_per_class = 4
eval_per_class = 2

[zo]
steps = 2

[[disclosure]]
value = "embedding_table"
to = ["data_owner"]

[[disclosure]]
value = "eval_accuracy"
to = ["data_owner", "model_owner"]

[[disclosure]]
value = "range_check"
to = ["data_owner", "model_owner"]

[[disclosure]]
value = "final_parameters"
to = ["data_owner"]
"""


@dataclasses.dataclass
class Deployment:
    root: Path
    ca_dir: Path
    model_dir: Path
    data_file: Path
    job_file: Path

    def cert(self, party_id: str) -> certs.IssuedFiles:
        d = self.root / "certs" / party_id
        return certs.IssuedFiles(
            cert=d / f"{party_id}.crt",
            key=d / f"{party_id}.key",
            ca=d / "ca.crt",
            identity=None,
            not_after=None,
        )  # type: ignore[arg-type]

    def party_raw(
        self,
        role: str,
        *,
        listen: str = "127.0.0.1:0",
        peers: dict[str, str] | None = None,
        state: str | None = None,
        **sections: Any,
    ) -> dict[str, Any]:
        """party.toml content (as parsed TOML) for ``role``; ``peers`` maps role -> address."""
        pid = IDS[role]
        c = self.cert(pid)
        raw: dict[str, Any] = {
            "party": {
                "id": pid,
                "role": role,
                "listen": listen,
                "state_dir": str(state or self.root / "state" / pid),
            },
            "tls": {"cert": str(c.cert), "key": str(c.key), "ca": str(c.ca)},
            "peers": [{"id": IDS[r], "role": r, "address": a} for r, a in (peers or {}).items()],
            "operators": [{"id": OPERATOR}],
            "jobs": {"shutdown_grace_s": 2.0, "peer_timeout_s": 5.0},
        }
        if role == "model_owner":
            raw["model"] = {"path": str(self.model_dir)}
        if role == "data_owner":
            raw["data"] = {"source": "jsonl", "path": str(self.data_file)}
        for k, v in sections.items():
            if isinstance(v, dict):
                raw.setdefault(k, {}).update(v)
            else:
                raw[k] = v
        return raw

    def party_config(self, role: str, **kw: Any):
        from secfwt.server.config import parse_party_config

        return parse_party_config(
            self.party_raw(role, **kw), where=f"<test {role}>", base=self.root
        )

    def creds(self, party_id: str = OPERATOR, role: IdentityRole = IdentityRole.OPERATOR):
        from secfwt.server.client import Credentials

        c = self.cert(party_id)
        return Credentials(
            identity=Identity(role, party_id),
            cert_pem=c.cert.read_bytes(),
            key_pem=c.key.read_bytes(),
            ca_pem=c.ca.read_bytes(),
        )

    def client(
        self,
        address: str,
        party_id: str = OPERATOR,
        *,
        expect: Identity | None = None,
        timeout_s: float = 10.0,
    ):
        from secfwt.server.client import PartyClient

        role = (
            IdentityRole.parse({v: k for k, v in IDS.items()}[party_id])
            if party_id in IDS.values()
            else IdentityRole.OPERATOR
        )
        return PartyClient(address, self.creds(party_id, role), expect=expect, timeout_s=timeout_s)

    def add_operator(self, name: str) -> None:
        """Issue an operator certificate for ``name`` (once), for :meth:`client`."""
        out = self.root / "certs" / name
        if not out.is_dir():
            certs.issue(
                ca_dir=self.ca_dir,
                role=IdentityRole.OPERATOR,
                party_id=name,
                hosts=[],
                out=out,
                days=30,
            )


def free_port() -> int:
    """A port the kernel just handed out and released: for daemons that must know each other's
    address before either starts (a tiny race with other processes; never a fixed number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_deployment(root: Path) -> Deployment:
    ca = root / "ca"
    certs.init_ca(ca, days=30)
    for role, pid in IDS.items():
        certs.issue(
            ca_dir=ca,
            role=IdentityRole(role),
            party_id=pid,
            hosts=["127.0.0.1", "localhost"],
            out=root / "certs" / pid,
            days=30,
        )
    for pid in (OPERATOR, "mallory"):  # mallory: valid CA, pinned nowhere
        certs.issue(
            ca_dir=ca,
            role=IdentityRole.OPERATOR,
            party_id=pid,
            hosts=[],
            out=root / "certs" / pid,
            days=30,
        )
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 400}
        )
    )
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    data = root / "data.jsonl"
    rows = [{"text": f"review number {i}", "label": ["neg", "pos"][i % 2]} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = root / "job.toml"
    job.write_text(JOB_TOML)
    return Deployment(root=root, ca_dir=ca, model_dir=model, data_file=data, job_file=job)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[dict[str, Any], str, str | None]]:
    """Three hosts for :class:`~tests.server.mpc_deploy.MpcDeployment` daemons: (Host by role,
    capture interface, bridge or None). One network namespace each where that works; otherwise
    distinct loopback addresses, said in pytest's summary."""
    import warnings

    from .mpc_deploy import ROLES, Host
    from .netns import make_hosts

    ns, why = make_hosts(list(ROLES))
    if ns is None:
        msg = (
            f"network namespaces could not be created ({why}); FALLING BACK to distinct loopback "
            "addresses 127.0.0.2-4 (one network stack)"
        )
        print(msg)
        warnings.warn(msg, stacklevel=1)
        yield {r: Host(r, f"127.0.0.{i + 2}") for i, r in enumerate(ROLES)}, "lo", None
        return
    print(f"hosts in network namespaces: {ns.namespaces} at {ns.addresses}, bridge {ns.bridge}")
    try:
        yield (
            {r: Host(r, ns.addresses[r], netns=ns.namespaces[r]) for r in ROLES},
            ns.bridge,
            ns.bridge,
        )
    finally:
        ns.close()


@pytest.fixture
def daemons() -> Iterator[list]:
    """Collects started PartyDaemons and stops them after the test."""
    started: list = []
    yield started
    for d in started:
        d.stop(grace=0.5)


def to_toml(raw: dict, val: Callable[[Any], str] | None = None) -> str:
    """Just enough TOML for party.toml: tables, arrays of tables, strings, numbers, booleans
    (``val`` writes a value, for more than that)."""

    def plain(v: object) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    val = val or plain
    out = []
    for key, table in raw.items():
        for t in table if isinstance(table, list) else [table]:
            out.append(f"[[{key}]]" if isinstance(table, list) else f"[{key}]")
            out += [f"{k} = {val(v)}" for k, v in t.items()]
    return "\n".join(out) + "\n"
