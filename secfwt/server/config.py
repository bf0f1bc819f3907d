"""Typed ``party.toml`` (one daemon) and ``client.toml`` (an operator's client), read like job
files.

Unknown sections and keys, wrong types and impossible values are :class:`ConfigError` naming the
field (the section parsers of :mod:`secfwt.config` are reused). Relative paths are relative to
the file's folder. A ``party.toml``::

    [party]
    id = "hospital-a"              # a DNS label; must equal the identity in tls.cert
    role = "data_owner"            # model_owner | data_owner | dealer
    listen = "0.0.0.0:7401"
    mpc_listen = "0.0.0.0:7402"    # MPC traffic of running jobs (TLS gRPC mesh);
                                   # default: listen's port + 1
    state_dir = "state"            # jobs, progress and finished results survive restarts here
    insecure = false               # true: plaintext, no certificates; local development only

    [tls]
    cert = "certs/hospital-a.crt"
    key = "certs/hospital-a.key"
    ca = "certs/ca.crt"            # the deployment CA: the only CA this daemon trusts

    [[peers]]                      # the other daemons this party works with (pinned identities)
    id = "vendor"
    role = "model_owner"
    address = "vendor.example.org:7401"
    mpc_address = "vendor.example.org:7402"   # its mpc_listen as seen from here;
                                              # default: address's port + 1

    [[operators]]                  # people's clients; they may accept, refuse, resume, fetch
                                   # and remove here
    id = "alice"                   # unless accept = false
                                   # (then: propose, start, watch, cancel only)

    [limits]                       # max_message_bytes, max_job_toml_bytes, queue_size,
                                   # max_proposals_per_caller, ...
    [jobs]                         # heartbeat_timeout_s, checkpoint_every_steps, proposal_ttl_s,
                                   # ...
    [data]                         # data owner only: what it holds (source, path, columns, labels)
    [model]                        # model owner only: path of the checkpoint it holds
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from secfwt.config import build_section
from secfwt.data.datasets import DataSource
from secfwt.data.refusal_margin import PACKAGED as PACKAGED_PROMPTS
from secfwt.errors import ConfigError
from secfwt.overrides import loads_toml, read_toml_text
from secfwt.pki.identity import Identity, IdentityRole, check_party_id
from secfwt.roles import Role
from secfwt.runtime.policy import SafetyPolicy, parse_policy


@dataclasses.dataclass(frozen=True)
class PartySection:
    id: str
    role: Role
    listen: str = "127.0.0.1:7401"
    mpc_listen: str = (
        ""  # where this party's MPC process listens for its peers; "" = listen's port + 1
    )
    state_dir: str = "state"
    insecure: bool = False

    @property
    def mpc_listen_address(self) -> str:
        return self.mpc_listen or _next_port(self.listen, where="party.mpc_listen")


@dataclasses.dataclass(frozen=True)
class TLSSection:
    cert: str = ""
    key: str = ""
    ca: str = ""


@dataclasses.dataclass(frozen=True)
class PeerEntry:
    id: str
    role: Role
    address: str
    # the peer's MPC listener (its party.mpc_listen as reachable from here); "" = address's port + 1
    mpc_address: str = ""

    @property
    def identity(self) -> Identity:
        return Identity(IdentityRole.of(self.role), self.id)

    @property
    def mpc_peer_address(self) -> str:
        return self.mpc_address or _next_port(
            self.address, where=f"[[peers]] {self.id} mpc_address"
        )


def _next_port(address: str, *, where: str) -> str:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) in (0, 65535):
        raise ConfigError(
            f"{where}: cannot derive it from {address!r} (port 0 or 65535); set it explicitly"
        )
    return f"{host}:{int(port) + 1}"


@dataclasses.dataclass(frozen=True)
class OperatorEntry:
    id: str
    # false: may propose, start, watch and cancel here, but not accept, refuse, resume, fetch
    # or remove
    accept: bool = True

    @property
    def identity(self) -> Identity:
        return Identity(IdentityRole.OPERATOR, self.id)


@dataclasses.dataclass(frozen=True)
class LimitsSection:
    max_message_bytes: int = 4 * 1024 * 1024  # any gRPC message, both directions
    max_job_toml_bytes: int = 64 * 1024
    queue_size: int = 4  # jobs waiting behind the running one; Start is refused beyond
    max_concurrent_rpcs: int = 32  # calls in flight; beyond, RESOURCE_EXHAUSTED
    worker_threads: int = 16  # threads serving calls
    # concurrent progress streams; kept below worker_threads so unary calls always get a thread
    max_streams: int = 8
    # jobs one caller proposed here that this party never accepted (proposed, refused, cancelled
    # before acceptance); beyond, Propose is refused (see secfwt.server.retention)
    max_proposals_per_caller: int = 16


@dataclasses.dataclass(frozen=True)
class JobsSection:
    heartbeat_timeout_s: float = (
        30.0  # a peer silent this long is declared failed (used by the MPC runner)
    )
    checkpoint_every_steps: int = 10  # per-party checkpoint interval (used by the MPC runner)
    peer_timeout_s: float = 10.0  # deadline of a call to a peer daemon (acceptance checks)
    shutdown_grace_s: float = (
        10.0  # SIGTERM: calls in flight get this long, then the running job is cancelled
    )
    # a job this party never accepted is removed this long after its last change (7 days)
    proposal_ttl_s: float = 7 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class HeldModel:
    path: str = ""


@dataclasses.dataclass(frozen=True)
class HeldData:
    source: DataSource = DataSource.ROTTEN_TOMATOES
    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    #: the columns (csv) or fields (jsonl) of instruction pairs, for jobs with data.task =
    #: "instructions" (causal-LM tuning); system_column "" = none
    prompt_column: str = "prompt"
    response_column: str = "response"
    system_column: str = ""
    #: The model's tokenizer (public: a vocabulary), a folder or packaged:NAME; "" = the job's
    #: model.path when this host has it (e.g. a packaged model). The data owner tokenizes with it.
    tokenizer: str = ""


@dataclasses.dataclass(frozen=True)
class PartyConfig:
    party: PartySection
    tls: TLSSection = TLSSection()
    peers: tuple[PeerEntry, ...] = ()
    operators: tuple[OperatorEntry, ...] = ()
    limits: LimitsSection = LimitsSection()
    jobs: JobsSection = JobsSection()
    model: HeldModel | None = None
    data: HeldData | None = None
    #: a model owner's safety policy: every proposal must carry its gate and defences
    safety_policy: SafetyPolicy | None = None
    source: str = "<built>"

    @property
    def identity(self) -> Identity:
        return Identity(IdentityRole.of(self.party.role), self.party.id)

    @property
    def state_dir(self) -> Path:
        return Path(self.party.state_dir)

    def pinned(self) -> frozenset[Identity]:
        """Every identity this daemon answers: its peers and its operators."""
        return frozenset([p.identity for p in self.peers] + [o.identity for o in self.operators])

    def peer(self, identity: Identity) -> PeerEntry | None:
        for p in self.peers:
            if p.identity == identity:
                return p
        return None


_PARTY_SECTIONS: dict[str, type] = {
    "party": PartySection,
    "tls": TLSSection,
    "limits": LimitsSection,
    "jobs": JobsSection,
    "model": HeldModel,
    "data": HeldData,
}
_PARTY_LISTS: dict[str, type] = {"peers": PeerEntry, "operators": OperatorEntry}
#: besides the sections above: a model owner's [safety_policy] (secfwt.runtime.policy)


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    return loads_toml(read_toml_text(path, what=what), where=str(path))


def _tables(
    raw: dict[str, Any], *, where: str, sections: dict[str, type], lists: dict[str, type]
) -> dict[str, Any]:
    known = set(sections) | set(lists)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{where}: unknown section [{key}]; valid sections: {', '.join(sorted(known))}"
            )
        if key in sections:
            out[key] = build_section(sections[key], value, f"{where}: [{key}]")
        else:
            if not isinstance(value, list):
                raise ConfigError(f"{where}: {key} must be a list of [[{key}]] tables")
            out[key] = tuple(
                build_section(lists[key], v, f"{where}: [[{key}]] #{i + 1}")
                for i, v in enumerate(value)
            )
    return out


def _resolve(base: Path, p: str) -> str:
    if not p:
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q))


def check_address(address: str, *, where: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"{where} = {address!r}: expected HOST:PORT, e.g. '10.0.0.2:7401' or '[::1]:7401'"
        )
    return address


def parse_party_config(raw: dict[str, Any], *, where: str, base: Path) -> PartyConfig:
    raw = dict(raw)
    policy_table = raw.pop("safety_policy", None)
    t = _tables(raw, where=where, sections=_PARTY_SECTIONS, lists=_PARTY_LISTS)
    if "party" not in t:
        raise ConfigError(f"{where}: missing [party] section (id, role, listen, state_dir)")
    party: PartySection = t["party"]
    check_party_id(party.id, where=f"{where}: party.id")
    check_address(party.listen, where=f"{where}: party.listen")
    if party.mpc_listen:
        check_address(party.mpc_listen, where=f"{where}: party.mpc_listen")
    party = dataclasses.replace(party, state_dir=_resolve(base, party.state_dir))
    tls: TLSSection = t.get("tls", TLSSection())
    tls = TLSSection(
        cert=_resolve(base, tls.cert), key=_resolve(base, tls.key), ca=_resolve(base, tls.ca)
    )
    if not party.insecure:
        missing = [k for k in ("cert", "key", "ca") if not getattr(tls, k)]
        if missing:
            raise ConfigError(
                f"{where}: [tls] {', '.join(missing)} missing: mutual TLS is the default (issue "
                "files with `secfwt certs issue`); "
                "party.insecure = true is for local development only"
            )
    model, data = t.get("model"), t.get("data")
    if model is not None:
        model = HeldModel(
            path=model.path if model.path.startswith("packaged:") else _resolve(base, model.path)
        )
    if data is not None and data.path:
        data = dataclasses.replace(data, path=_resolve(base, data.path))
    if data is not None and data.tokenizer and not data.tokenizer.startswith("packaged:"):
        data = dataclasses.replace(data, tokenizer=_resolve(base, data.tokenizer))
    _check_holdings(party.role, model, data, where=where)
    peers: tuple[PeerEntry, ...] = t.get("peers", ())
    operators: tuple[OperatorEntry, ...] = t.get("operators", ())
    seen: set[Identity] = set()
    for i, p in enumerate(peers):
        check_party_id(p.id, where=f"{where}: [[peers]] #{i + 1} id")
        check_address(p.address, where=f"{where}: [[peers]] #{i + 1} address")
        if p.mpc_address:
            check_address(p.mpc_address, where=f"{where}: [[peers]] #{i + 1} mpc_address")
        if p.identity in seen or (p.id == party.id and p.role is party.role):
            raise ConfigError(
                f"{where}: [[peers]] #{i + 1} {p.identity} is listed twice or is this party itself"
            )
        seen.add(p.identity)
    for i, o in enumerate(operators):
        check_party_id(o.id, where=f"{where}: [[operators]] #{i + 1} id")
    limits: LimitsSection = t.get("limits", LimitsSection())
    for name in (
        "max_message_bytes",
        "max_job_toml_bytes",
        "queue_size",
        "max_concurrent_rpcs",
        "worker_threads",
        "max_streams",
        "max_proposals_per_caller",
    ):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"{where}: limits.{name} = {getattr(limits, name)}: must be > 0")
    if limits.max_streams >= limits.worker_threads:
        raise ConfigError(
            f"{where}: limits.max_streams ({limits.max_streams}) must be below "
            f"limits.worker_threads ({limits.worker_threads})"
        )
    if limits.max_message_bytes < limits.max_job_toml_bytes + 4096:
        raise ConfigError(
            f"{where}: limits.max_message_bytes must exceed limits.max_job_toml_bytes by at "
            "least 4096 (a proposal carries the job file)"
        )
    jobs: JobsSection = t.get("jobs", JobsSection())
    for name in (
        "heartbeat_timeout_s",
        "checkpoint_every_steps",
        "peer_timeout_s",
        "proposal_ttl_s",
    ):
        if not getattr(jobs, name) > 0:  # NaN too
            raise ConfigError(f"{where}: jobs.{name} = {getattr(jobs, name)}: must be > 0")
    if not jobs.shutdown_grace_s >= 0:
        raise ConfigError(f"{where}: jobs.shutdown_grace_s = {jobs.shutdown_grace_s}: must be >= 0")
    policy = None
    if policy_table is not None:
        if party.role is not Role.MODEL_OWNER:
            raise ConfigError(
                f"{where}: [safety_policy] is the model owner's; a {party.role.value} daemon does "
                "not enforce one. Remove the section"
            )
        policy = parse_policy(policy_table, where=where)
        if policy.prompts != PACKAGED_PROMPTS and not Path(policy.prompts).is_absolute():
            raise ConfigError(
                f"{where}: safety_policy.prompts = {policy.prompts!r}: give {PACKAGED_PROMPTS!r} "
                "or an absolute path (jobs must name the same file, read on this host)"
            )
    return PartyConfig(
        party=party,
        tls=tls,
        peers=peers,
        operators=operators,
        limits=limits,
        jobs=jobs,
        model=model,
        data=data,
        safety_policy=policy,
        source=where,
    )


def _check_holdings(
    role: Role, model: HeldModel | None, data: HeldData | None, *, where: str
) -> None:
    if role is Role.MODEL_OWNER and (model is None or not model.path):
        raise ConfigError(
            f"{where}: a model owner needs [model] path = the checkpoint it holds (a folder or "
            "packaged:NAME)"
        )
    if role is Role.DATA_OWNER and data is None:
        raise ConfigError(
            f"{where}: a data owner needs a [data] section: the dataset it holds (source, path, "
            "text_column, label_column)"
        )
    if role is not Role.MODEL_OWNER and model is not None:
        raise ConfigError(f"{where}: [model] is for the model owner; party.role is {role.value}")
    if role is not Role.DATA_OWNER and data is not None:
        raise ConfigError(f"{where}: [data] is for the data owner; party.role is {role.value}")
    if data is not None and data.source is not DataSource.ROTTEN_TOMATOES and not data.path:
        raise ConfigError(
            f"{where}: data.path is required when data.source = {data.source.value!r}"
        )


def load_party_config(path: str | Path) -> PartyConfig:
    p = Path(path)
    return parse_party_config(_read_toml(p, "party config"), where=str(p), base=p.resolve().parent)


# -- client.toml -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientSection:
    id: str = "operator"
    role: IdentityRole = IdentityRole.OPERATOR  # sent as a claim only with insecure = true
    insecure: bool = False
    timeout_s: float = 30.0


#: A daemon the client knows: dialled with its identity as the TLS target name (pinned); the
#: same fields as a daemon's pinned peer.
ClientParty = PeerEntry


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    client: ClientSection = ClientSection()
    tls: TLSSection = TLSSection()
    parties: tuple[ClientParty, ...] = ()
    source: str = "<flags>"

    @property
    def identity(self) -> Identity:
        return Identity(self.client.role, self.client.id)

    def party_at(self, address: str) -> ClientParty | None:
        for p in self.parties:
            if p.address == address:
                return p
        return None


def parse_client_config(raw: dict[str, Any], *, where: str, base: Path) -> ClientConfig:
    t = _tables(
        raw,
        where=where,
        sections={"client": ClientSection, "tls": TLSSection},
        lists={"parties": ClientParty},
    )
    client: ClientSection = t.get("client", ClientSection())
    check_party_id(client.id, where=f"{where}: client.id")
    if client.timeout_s <= 0:
        raise ConfigError(f"{where}: client.timeout_s must be > 0")
    tls: TLSSection = t.get("tls", TLSSection())
    tls = TLSSection(
        cert=_resolve(base, tls.cert), key=_resolve(base, tls.key), ca=_resolve(base, tls.ca)
    )
    parties: tuple[ClientParty, ...] = t.get("parties", ())
    for i, p in enumerate(parties):
        check_party_id(p.id, where=f"{where}: [[parties]] #{i + 1} id")
        check_address(p.address, where=f"{where}: [[parties]] #{i + 1} address")
    return ClientConfig(client=client, tls=tls, parties=parties, source=where)


def load_client_config(path: str | Path) -> ClientConfig:
    p = Path(path)
    return parse_client_config(
        _read_toml(p, "client config"), where=str(p), base=p.resolve().parent
    )
