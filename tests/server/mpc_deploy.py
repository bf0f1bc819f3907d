"""Three real party daemons (``secfwt party ROLE``, separate OS processes) that run MPC jobs.

Used by the multi-host tests: each daemon gets its own address (distinct loopback addresses, or
an address inside its own network namespace when ``netns`` prefixes are given), certificates
from a fresh deployment CA, a ``party.toml`` written as a user would, and is driven only
through the ``secfwt job`` CLI. Nothing is mocked: the MPC runs in the daemons' own processes
over the TLS mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secfwt.pki import certs
from secfwt.pki.identity import IdentityRole

from .conftest import IDS, OPERATOR, to_toml

ROLES = ("model_owner", "data_owner", "dealer")
SECFWT = [sys.executable, "-m", "secfwt.cli"]


@dataclasses.dataclass
class Host:
    role: str
    ip: str
    netns: str | None = None  # run the daemon inside this network namespace
    port: int = 7401

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []


@dataclasses.dataclass
class MpcDeployment:
    root: Path
    hosts: dict[str, Host]
    model_dir: Path
    fixed_seed: int | None = None
    heartbeat_s: float = 30.0
    checkpoint_every: int = 10
    #: the data owner's [data] table; default: rotten_tomatoes, tokenized with model_dir's tokenizer
    data: dict[str, Any] | None = None
    #: more party.toml tables by role, e.g. the model owner's [safety_policy]
    sections: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    # -- set-up -----------------------------------------------------------------------------
    def write(self) -> None:
        ca = self.root / "ca"
        certs.init_ca(ca, days=30)
        for role, host in self.hosts.items():
            certs.issue(
                ca_dir=ca,
                role=IdentityRole(role),
                party_id=IDS[role],
                hosts=[host.ip],
                out=self.root / "certs" / IDS[role],
                days=30,
            )
        certs.issue(
            ca_dir=ca,
            role=IdentityRole.OPERATOR,
            party_id=OPERATOR,
            hosts=[],
            out=self.root / "certs" / OPERATOR,
            days=30,
        )
        for role in self.hosts:
            self.config_path(role).write_text(to_toml(self.party_raw(role)))
        c = self.root / "certs" / OPERATOR
        client = {
            "client": {"id": OPERATOR, "timeout_s": 30.0},
            "tls": {
                "cert": str(c / f"{OPERATOR}.crt"),
                "key": str(c / f"{OPERATOR}.key"),
                "ca": str(c / "ca.crt"),
            },
            "parties": [
                {"id": IDS[r], "role": r, "address": h.address} for r, h in self.hosts.items()
            ],
        }
        self.client_config.write_text(to_toml(client))

    def party_raw(self, role: str) -> dict[str, Any]:
        pid = IDS[role]
        c = self.root / "certs" / pid
        raw: dict[str, Any] = {
            "party": {
                "id": pid,
                "role": role,
                "listen": self.hosts[role].address,
                "state_dir": str(self.state_dir(role)),
            },
            "tls": {
                "cert": str(c / f"{pid}.crt"),
                "key": str(c / f"{pid}.key"),
                "ca": str(c / "ca.crt"),
            },
            "peers": [
                {"id": IDS[r], "role": r, "address": h.address}
                for r, h in self.hosts.items()
                if r != role
            ],
            "operators": [{"id": OPERATOR}],
            "jobs": {
                "heartbeat_timeout_s": self.heartbeat_s,
                "checkpoint_every_steps": self.checkpoint_every,
                "shutdown_grace_s": 5.0,
            },
        }
        if role == "model_owner":
            raw["model"] = {"path": str(self.model_dir)}
        if role == "data_owner":
            raw["data"] = self.data or {
                "source": "rotten_tomatoes",
                "tokenizer": str(self.model_dir),
            }
        raw.update(self.sections.get(role, {}))
        return raw

    def config_path(self, role: str) -> Path:
        return self.root / f"{role}.toml"

    def state_dir(self, role: str) -> Path:
        return self.root / "state" / IDS[role]

    @property
    def client_config(self) -> Path:
        return self.root / "client.toml"

    # -- daemons ----------------------------------------------------------------------------
    def start(self, role: str) -> None:
        host = self.hosts[role]
        cmd = [
            *host.prefix,
            *SECFWT,
            "party",
            role.replace("_", "-"),
            "--config",
            str(self.config_path(role)),
        ]
        if self.fixed_seed is not None:
            cmd += ["--insecure-fixed-seed", str(self.fixed_seed)]
        log = open(self.root / f"{role}.stderr", "ab")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.procs[role] = subprocess.Popen(
            cmd, stdout=log, stderr=log, env=env, start_new_session=True
        )
        self.wait_healthy(role)

    @contextlib.contextmanager
    def running(self) -> Iterator[MpcDeployment]:
        """Write the deployment, start the three daemons, stop them on exit."""
        self.write()
        self.start_all()
        try:
            yield self
        finally:
            self.stop_all()

    def start_all(self) -> None:
        for role in self.hosts:
            self.start(role)

    def wait_healthy(self, role: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            p = self.procs[role]
            if p.poll() is not None:
                raise RuntimeError(
                    f"{role} daemon exited with {p.returncode}: "
                    f"{(self.root / f'{role}.stderr').read_text()[-2000:]}"
                )
            r = self.run_in(
                role, ["party", "health", "--config", str(self.config_path(role))], check=False
            )
            if r.returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{role} daemon not healthy within {timeout_s} s")

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon and every process of its session (its MPC process included)."""
        p = self.procs[role]
        os.killpg(p.pid, sig)
        p.wait(timeout=30)

    def stop_all(self) -> None:
        for _role, p in self.procs.items():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _role, p in self.procs.items():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    # -- the operator's CLI -------------------------------------------------------------------
    def run_in(
        self, role: str | None, args: list[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        prefix = self.hosts[role].prefix if role else []
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        r = subprocess.run(
            [*prefix, *SECFWT, *args], capture_output=True, text=True, timeout=timeout, env=env
        )
        if check and r.returncode != 0:
            raise RuntimeError(
                f"secfwt {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
            )
        return r

    def job(self, *args: str, via: str | None = None, check: bool = True) -> Any:
        """``secfwt job ... --client-config client.toml --json`` from ``via``'s host (default: the
        root namespace)."""
        r = self.run_in(
            via, ["job", *args, "--client-config", str(self.client_config), "--json"], check=check
        )
        return json.loads(r.stdout) if r.returncode == 0 else r

    def status(self, job_id: str, role: str) -> dict[str, Any]:
        out = self.job("status", job_id, "--to", self.hosts[role].address)
        return next(iter(out["parties"].values())) if "parties" in out else out

    def role_at(self, address: str) -> str:
        """The role whose daemon listens at ``address`` (the key of a CLI answer's party)."""
        return next(r for r, h in self.hosts.items() if h.address == address)

    def wait_state(
        self, job_id: str, role: str, states: set[str], timeout_s: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.status(job_id, role)
            if st.get("state") in states:
                return st
            time.sleep(1.0)
        raise TimeoutError(
            f"job {job_id} at {role}: state {st.get('state')} ({st.get('reason')}) "
            f"after {timeout_s} s, wanted {states}"
        )

    def wait_all(
        self, job_id: str, states: set[str], timeout_s: float
    ) -> dict[str, dict[str, Any]]:
        """Each party's status once it reached one of ``states``."""
        return {r: self.wait_state(job_id, r, states, timeout_s) for r in self.hosts}

    def stderr(self, role: str) -> str:
        return (self.root / f"{role}.stderr").read_text(errors="replace")
