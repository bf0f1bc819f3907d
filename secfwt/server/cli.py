"""``secfwt party``, ``secfwt job`` and ``secfwt certs``: argparse wiring and thin command
functions.

:func:`register` adds the three command groups to the ``secfwt`` parser (one call from
:func:`secfwt.cli.build_parser`). Each command parses, calls the library, prints (text, or JSON
with ``--json``) and lets :class:`SecfwtError` reach ``secfwt.cli.main``, which maps it to the
numbered exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from secfwt.errors import ConfigError
from secfwt.roles import Role

PARTY_COMMANDS = {
    "model-owner": Role.MODEL_OWNER,
    "data-owner": Role.DATA_OWNER,
    "dealer": Role.DEALER,
}


def _out(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


# -- certs -----------------------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from secfwt.pki.certs import init_ca

    f = init_ca(Path(args.out), common_name=args.name, days=args.days, force=args.force)
    _out(
        args,
        {"ca_cert": str(f.cert), "ca_key": str(f.key), "not_after": f.not_after.isoformat()},
        f"deployment CA written: {f.cert} (certificate), {f.key} (private key, mode 0600; keep it "
        f"offline), valid until {f.not_after:%Y-%m-%d}",
    )
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from secfwt.pki.certs import issue
    from secfwt.pki.identity import Identity, IdentityRole

    role = IdentityRole.parse(args.role)
    f = issue(
        ca_dir=Path(args.ca),
        role=role,
        party_id=args.name,
        hosts=args.host or [],
        out=Path(args.out),
        days=args.days,
        force=args.force,
    )
    ident = Identity(role, args.name)
    data = {
        "identity": ident.uri,
        "tls_name": ident.dns_name,
        "hosts": args.host or [],
        "cert": str(f.cert),
        "key": str(f.key),
        "ca": str(f.ca),
        "not_after": f.not_after.isoformat(),
    }
    _out(
        args,
        data,
        f"issued {ident.uri} (TLS name {ident.dns_name}; hosts: "
        f"{', '.join(args.host or []) or '-'}): {f.cert}, {f.key} (0600), CA copy {f.ca}; valid "
        f"until {f.not_after:%Y-%m-%d}",
    )
    return 0


# -- party -----------------------------------------------------------------------------------------


def cmd_party(args: argparse.Namespace) -> int:
    from secfwt.server.daemon import run_party

    if args.party_role == "health":
        return cmd_party_health(args)
    return run_party(
        PARTY_COMMANDS[args.party_role],
        args.config,
        insecure=args.insecure,
        verbose=getattr(args, "verbose", False),
        insecure_fixed_seed=args.insecure_fixed_seed,
    )


def cmd_party_health(args: argparse.Namespace) -> int:
    """Probe: ask this host's daemon for its grpc.health.v1 status with the party's own certificate
    (Kubernetes exec probes, systemd, compose healthchecks: native gRPC probes cannot do mutual
    TLS)."""
    from secfwt.server.client import Credentials, PartyClient
    from secfwt.server.config import load_party_config

    cfg = load_party_config(args.config)
    host, _, port = cfg.party.listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    with PartyClient(
        f"{host}:{port}",
        Credentials.of_party(cfg),
        expect=None if cfg.party.insecure else cfg.identity,
        timeout_s=5,
    ) as c:
        status = c.health()
    print(status)
    return 0 if status == "SERVING" else 10


# -- job (client) ----------------------------------------------------------------------------------


def _client_config(args: argparse.Namespace):  # noqa: ANN202
    import dataclasses

    from secfwt.pki.identity import Identity
    from secfwt.server.config import ClientConfig, TLSSection, load_client_config

    cfg = load_client_config(args.client_config) if args.client_config else ClientConfig()
    tls = TLSSection(
        cert=args.cert or cfg.tls.cert, key=args.key or cfg.tls.key, ca=args.ca or cfg.tls.ca
    )
    client = cfg.client
    if args.insecure:
        client = dataclasses.replace(client, insecure=True)
    if args.identity:
        ident = Identity.parse_uri(args.identity)
        client = dataclasses.replace(client, role=ident.role, id=ident.party_id)
    if args.timeout:
        client = dataclasses.replace(client, timeout_s=args.timeout)
    return dataclasses.replace(cfg, client=client, tls=tls)


def _targets(args: argparse.Namespace, cfg) -> list[str]:  # noqa: ANN001
    addrs = list(args.to or []) or [p.address for p in cfg.parties]
    if not addrs:
        raise ConfigError(
            "no daemon address: pass --to HOST:PORT (repeatable) or list [[parties]] in client.toml"
        )
    return addrs


def _client(cfg, address: str):  # noqa: ANN001, ANN202
    from secfwt.server.client import Credentials, PartyClient

    known = cfg.party_at(address)
    return PartyClient(
        address,
        Credentials.of_client(cfg),
        expect=known.identity if known else None,
        timeout_s=cfg.client.timeout_s,
    )


def _status_dict(st) -> dict[str, Any]:  # noqa: ANN001
    from secfwt.server.convert import status_to_dict

    return status_to_dict(st)


def _status_line(d: dict[str, Any]) -> str:
    line = f"{d['party']:<28} {d['state']:<10}"
    if d.get("last_progress") and d["last_progress"].get("total_steps"):
        lp = d["last_progress"]
        line += f" step {lp['step']}/{lp['total_steps']}"
    scores = (d.get("last_progress") or {}).get("metrics", {})
    if "score_before" in scores and "score_after" in scores:  # the safety gate's, once it ran
        line += f" safety score {scores['score_before']:.4f} -> {scores['score_after']:.4f}"
    if d["reason"]:
        line += f"  ({d['reason']})"
    return line


def _each(args: argparse.Namespace, action, view=_status_dict, line=_status_line) -> int:  # noqa: ANN001
    """Run ``action(client)`` at every target, shown through ``view`` (a dict) and ``line``
    (default: a JobStatus); print; the first error decides the exit code."""
    from secfwt.errors import SecfwtError, exit_code_for

    cfg = _client_config(args)
    results: dict[str, Any] = {}
    first_error: SecfwtError | None = None
    for addr in _targets(args, cfg):
        try:
            with _client(cfg, addr) as c:
                results[addr] = view(action(c))
        except SecfwtError as exc:
            results[addr] = {"error": str(exc), "exit_code": exit_code_for(exc)}
            first_error = first_error or exc
    lines = [
        f"{a}: " + (f"ERROR {r['error']}" if "error" in r else line(r)) for a, r in results.items()
    ]
    _out(args, {"job_id": args.job_id, "parties": results}, "\n".join(lines))
    if first_error is not None:
        return exit_code_for(first_error)
    return 0


def cmd_job_status(args: argparse.Namespace) -> int:
    return _each(args, lambda c: c.status(args.job_id))


def cmd_job_cancel(args: argparse.Namespace) -> int:
    return _each(args, lambda c: c.cancel(args.job_id, args.reason or ""))


def cmd_job_resume(args: argparse.Namespace) -> int:
    return _each(args, lambda c: c.resume(args.job_id))


def cmd_job_remove(args: argparse.Namespace) -> int:
    return _each(
        args,
        lambda c: c.remove(args.job_id),
        view=lambda r: {"removed": r.job_id, "freed_bytes": r.freed_bytes},
        line=lambda d: f"removed job {d['removed']} ({d['freed_bytes']} bytes freed)",
    )


def cmd_job_start(args: argparse.Namespace) -> int:
    return _each(args, lambda c: c.start(args.job_id))


def cmd_job_accept(args: argparse.Namespace) -> int:
    return _each(args, lambda c: c.accept(args.job_id, args.digest, args.proposal_digest or ""))


def cmd_job_refuse(args: argparse.Namespace) -> int:
    return _each(args, lambda c: c.refuse(args.job_id, args.reason or ""))


def cmd_job_fetch(args: argparse.Namespace) -> int:
    cfg = _client_config(args)
    targets = _targets(args, cfg)
    if len(targets) != 1:
        raise ConfigError("job fetch: give exactly one --to (the daemon whose results you fetch)")
    with _client(cfg, targets[0]) as c:
        files = c.fetch(args.job_id, Path(args.out))
    _out(
        args,
        {"job_id": args.job_id, "from": targets[0], "files": [str(f) for f in files]},
        f"fetched {len(files)} artifact(s) of job {args.job_id} from {targets[0]} into {args.out}: "
        + ", ".join(f.name for f in files),
    )
    return 0


def cmd_job_watch(args: argparse.Namespace) -> int:
    cfg = _client_config(args)
    targets = _targets(args, cfg)
    with _client(cfg, targets[0]) as c:
        for ev in c.watch(args.job_id, after_seq=args.after):
            d = ev.to_dict()
            if args.json:
                print(json.dumps(d), flush=True)
            else:
                step = f" step {ev.step}/{ev.total_steps}" if ev.total_steps else ""
                metrics = " ".join(f"{k}={v:.4g}" for k, v in ev.metrics)
                message = "" if ev.message == ev.state.value else ev.message
                print(
                    " ".join(
                        x
                        for x in (f"[{ev.seq}] {ev.state.value}{step}", ev.phase, metrics, message)
                        if x
                    ),
                    flush=True,
                )
    return 0


def _new_job_id(name: str) -> str:
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.")[:32] or "job"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def cmd_job_submit(args: argparse.Namespace) -> int:
    """Hello every daemon, collect the owners' commitments, propose to all, accept where this client
    is an operator, start when every party accepted."""
    from secfwt.errors import SecfwtError
    from secfwt.server.errors import NotAuthorizedError, VersionMismatchError
    from secfwt.server.jobfile import read_job_file
    from secfwt.server.protocol import PROTOCOL_VERSION, Commitments, Proposal

    text, job = read_job_file(Path(args.job))
    cfg = _client_config(args)
    clients = {addr: _client(cfg, addr) for addr in _targets(args, cfg)}
    report: dict[str, Any] = {"parties": {}}
    try:
        by_role: dict[Role, str] = {}
        idents = {}
        for addr, c in clients.items():
            info = c.hello()
            if info.protocol_version != PROTOCOL_VERSION:
                raise VersionMismatchError(
                    f"{addr} speaks protocol version {info.protocol_version}, this client "
                    f"{PROTOCOL_VERSION}"
                )
            role = info.identity.role.party_role if info.identity else None
            if role is None or role in by_role:
                raise ConfigError(
                    f"{addr} is {info.identity}: submit needs one model owner, one data owner and "
                    "one dealer"
                )
            by_role[role], idents[addr] = addr, info.identity
        missing = [r.value for r in Role if r not in by_role]
        if missing:
            raise ConfigError(
                f"submit needs the addresses of all three parties; missing: {', '.join(missing)}"
            )
        model = clients[by_role[Role.MODEL_OWNER]].commitment(text).model
        data = clients[by_role[Role.DATA_OWNER]].commitment(text).data
        terms = job.terms
        proposal = Proposal(
            job_id=args.id or _new_job_id(job.job.name),
            protocol_version=PROTOCOL_VERSION,
            job_toml=text,
            terms=terms,
            terms_digest=terms.digest(),
            commitments=Commitments(model=model, data=data),
            participants=tuple(idents.values()),
        )
        report.update(
            job_id=proposal.job_id,
            terms_digest=proposal.terms_digest,
            proposal_digest=proposal.digest(),
            terms=terms.describe(),
            commitments=proposal.commitments.to_dict(),
        )
        if not args.json:
            print(f"job {proposal.job_id}: terms digest {proposal.terms_digest}\ndisclosure terms:")
            for line in terms.describe():
                print(f"  - {line}")
        for addr, c in clients.items():
            report["parties"][addr] = _status_dict(c.propose(proposal))
        accepted = 0
        if not args.no_accept:
            for addr, c in clients.items():
                try:
                    report["parties"][addr] = _status_dict(
                        c.accept(proposal.job_id, proposal.terms_digest, proposal.digest())
                    )
                    accepted += 1
                except NotAuthorizedError:
                    report["parties"][addr]["note"] = (
                        "awaiting acceptance by this party's own operator (`secfwt job accept`)"
                    )
        if accepted == len(clients) and not args.no_start:
            for addr, c in clients.items():
                report["parties"][addr] = _status_dict(c.start(proposal.job_id))
    except SecfwtError:
        if report.get("job_id") and not args.json:
            print(
                f"job {report['job_id']}: submission stopped; `secfwt job status "
                f"{report['job_id']}` shows each party",
                file=sys.stderr,
            )
        raise
    finally:
        for c in clients.values():
            c.close()
    lines = [
        f"{a}: {_status_line(r)}" + (f"  [{r['note']}]" if r.get("note") else "")
        for a, r in report["parties"].items()
    ]
    _out(args, report, "\n".join(lines))
    return 0


# -- wiring ----------------------------------------------------------------------------------------


def _client_flags(
    p: argparse.ArgumentParser,
    *,
    to_help: str = "daemon address HOST:PORT (repeatable; default: [[parties]] of client.toml)",
) -> None:
    p.add_argument("--to", action="append", metavar="HOST:PORT", help=to_help)
    p.add_argument(
        "--client-config",
        metavar="CLIENT.toml",
        default=os.environ.get("SECFWT_CLIENT_CONFIG") or None,
        help=(
            "[client], [tls] cert/key/ca, [[parties]] id/role/address (default: "
            "$SECFWT_CLIENT_CONFIG)"
        ),
    )
    p.add_argument("--cert", help="this client's certificate (secfwt certs issue operator ...)")
    p.add_argument("--key", help="its private key")
    p.add_argument("--ca", help="the deployment CA certificate")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, for daemons started with --insecure (local development only)",
    )
    p.add_argument(
        "--identity",
        metavar="secfwt://ROLE/ID",
        help="with --insecure: the identity to claim (default secfwt://operator/operator)",
    )
    p.add_argument("--timeout", type=float, help="seconds per call (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _daemon_flags(p: argparse.ArgumentParser) -> None:
    """The development-only switches of a daemon (`secfwt party ROLE` and `parties/ROLE.py`)."""
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no certificates: local development only (needs party.insecure = true too)",
    )
    p.add_argument(
        "--insecure-fixed-seed",
        type=int,
        metavar="N",
        help=(
            "TESTS ONLY: every MPC seed derived from N, so runs are reproducible bit for bit; "
            "anyone knowing N can unmask every share"
        ),
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``party``, ``job`` and ``certs`` to the ``secfwt`` command."""
    party = sub.add_parser("party", help="run a party daemon (gRPC, mutual TLS)")
    party.add_argument(
        "party_role",
        choices=[*sorted(PARTY_COMMANDS), "health"],
        help="which daemon to run, or `health`: probe this host's daemon",
    )
    party.add_argument("--config", required=True, metavar="party.toml")
    _daemon_flags(party)
    party.set_defaults(func=cmd_party)

    job = sub.add_parser("job", help="submit and manage jobs on party daemons")
    jsub = job.add_subparsers(dest="job_command", required=True)
    s = jsub.add_parser(
        "submit", help="propose a job to the three daemons, accept where you are an operator, start"
    )
    s.add_argument("job", help="job TOML")
    s.add_argument("--id", help="job id (default: NAME-TIME-RANDOM); never reuse one")
    s.add_argument(
        "--no-accept",
        action="store_true",
        help="only propose; each party's operator accepts with `secfwt job accept`",
    )
    s.add_argument(
        "--no-start",
        action="store_true",
        help="propose and accept, start later with `secfwt job start`",
    )
    _client_flags(
        s, to_help="address of each party's daemon (give all three, or list them in client.toml)"
    )
    s.set_defaults(func=cmd_job_submit)
    for name, func, help_ in (
        ("status", cmd_job_status, "state of a job at each daemon"),
        (
            "start",
            cmd_job_start,
            "start an accepted job (every owner must have accepted the same digests)",
        ),
        ("cancel", cmd_job_cancel, "cancel a job"),
        (
            "resume",
            cmd_job_resume,
            "resume a failed or cancelled job from its last checkpoint (operators of that daemon "
            "only)",
        ),
        (
            "remove",
            cmd_job_remove,
            "delete an ended job's record and artifacts there; its id stays used (operators of "
            "that daemon only)",
        ),
        ("accept", cmd_job_accept, "accept a proposed job's terms (operators of that daemon only)"),
        ("refuse", cmd_job_refuse, "refuse a proposed job (operators of that daemon only)"),
        ("fetch", cmd_job_fetch, "download a finished job's artifacts from one daemon"),
        ("watch", cmd_job_watch, "stream a job's progress from one daemon"),
    ):
        c = jsub.add_parser(name, help=help_)
        c.add_argument("job_id", metavar="ID")
        if name == "accept":
            c.add_argument(
                "--digest",
                required=True,
                help="the terms digest you reviewed (shown by submit and status)",
            )
            c.add_argument(
                "--proposal-digest",
                help="also pin the whole proposal (job file, commitments, participants)",
            )
        if name in ("cancel", "refuse"):
            c.add_argument("--reason", help="recorded with the job")
        if name == "fetch":
            c.add_argument("--out", required=True, help="folder for the artifacts")
        if name == "watch":
            c.add_argument(
                "--after", type=int, default=0, help="only events after this sequence number"
            )
        _client_flags(c)
        c.set_defaults(func=func)

    certs = sub.add_parser("certs", help="deployment CA and party/operator certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    i = csub.add_parser("init", help="create the deployment CA (ca.crt, ca.key)")
    i.add_argument("--out", required=True, help="folder for ca.crt and ca.key")
    i.add_argument("--days", type=float, default=3650, help="validity (default 3650)")
    i.add_argument("--name", default="secfwt deployment CA", help="CA common name")
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_certs_init)
    s = csub.add_parser("issue", help="issue a party or operator certificate signed by the CA")
    s.add_argument(
        "role",
        choices=["model-owner", "data-owner", "dealer", "operator", "model_owner", "data_owner"],
        help="identity role",
    )
    s.add_argument("--ca", required=True, help="the CA folder (ca.crt, ca.key)")
    s.add_argument("--name", required=True, help="party id: lower-case letters, digits, dashes")
    s.add_argument(
        "--host", action="append", help="DNS name or IP address the daemon serves on (repeatable)"
    )
    s.add_argument(
        "--out", required=True, help="folder for NAME.crt, NAME.key and a copy of ca.crt"
    )
    s.add_argument("--days", type=float, default=365, help="validity (default 365)")
    s.add_argument("--force", action="store_true", help="overwrite existing files")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_certs_issue)


def party_main(role: Role, argv: list[str] | None = None) -> int:
    """Entry point of ``parties/ROLE.py``: the same daemon as ``secfwt party ROLE``."""
    from secfwt.errors import SecfwtError, exit_code_for
    from secfwt.server.daemon import run_party

    p = argparse.ArgumentParser(
        prog=f"secfwt-{role.value.replace('_', '-')}",
        description=f"secfwt {role.value} party daemon (gRPC, mutual TLS)",
    )
    p.add_argument("--config", required=True, metavar="party.toml")
    _daemon_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    try:
        return run_party(
            role,
            args.config,
            insecure=args.insecure,
            verbose=args.verbose,
            insecure_fixed_seed=args.insecure_fixed_seed,
        )
    except SecfwtError as exc:
        print(f"secfwt: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
