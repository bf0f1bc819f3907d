"""Hypothesis strategies for requests to a party daemon: every RPC, hostile and odd content.

A request is drawn as ``(method, payload bytes)``: random bytes; a generated message of the
method's type whose fields hold odd identifiers, hostile job files and extreme numbers; or such a
message serialized and then mutated byte by byte. Valid content (a real job file, its terms and
digests, the ids of jobs the daemon holds) is mixed in, so that the checks behind the first
refusals are reached too.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import string
import tomllib
import typing
from typing import Any

from hypothesis import strategies as st

from secfwt.config import JobConfig
from secfwt.mpc.disclosure import Revealable
from secfwt.v1 import party_pb2 as pb
from tests.server.conftest import to_toml

#: Every method of PartyService, with its request type; the streaming ones are marked.
METHODS: dict[str, type] = {
    "Hello": pb.HelloRequest,
    "GetCommitment": pb.GetCommitmentRequest,
    "Propose": pb.ProposeRequest,
    "Accept": pb.AcceptRequest,
    "Refuse": pb.RefuseRequest,
    "Start": pb.StartRequest,
    "Status": pb.StatusRequest,
    "WatchProgress": pb.WatchProgressRequest,
    "Cancel": pb.CancelRequest,
    "Resume": pb.ResumeRequest,
    "FetchArtifacts": pb.FetchArtifactsRequest,
    "Remove": pb.RemoveRequest,
}
STREAMING = frozenset({"WatchProgress", "FetchArtifacts"})

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
ENUM = st.integers(-(2**31), 2**31 - 1)  # proto3 enums are open: any int32 arrives

ODD_IDS = [
    "",
    "baseline-1\n",
    "\nbaseline-1",
    "../etc/passwd",
    "a" * 64,
    "a" * 65,
    ".hidden",
    "-dash",
    "ok\x00nul",
    "caf\u00e9",
    "a b",
    "a/b",
    "CON",
    "\u202eevil",
    "x" * 5000,
]
ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=120)


def _deep(open_: str, close: str, n: int, inner: str = "1") -> str:
    return open_ * n + inner + close * n


#: Job files an attacker would send: nesting past the parser, huge and odd values.
HOSTILE_TOML = [
    "x = " + _deep("[", "]", 1000, ""),
    "x = " + _deep("{a=", "}", 1000),
    "x = " + _deep("[", "]", 400, ""),  # within the parser's reach
    "a" + ".a" * 2000 + " = 1",
    "[" + ".".join(["t"] * 2000) + "]",
    "[job]\nname = " + _deep("[", "]", 300, '"x"'),
    "[model]\nmax_length = " + "9" * 40,
    "[model]\nmax_length = 18446744073709551617",
    "[data]\nshots_per_class = 99999999999999999999\neval_per_class = 1",
    "[zo]\nlr = nan\neps = inf",
    "[run]\ntimeout_s = -inf",
    '[job]\nname = "' + "\U0001f600" * 20000 + '"',
    '[job]\nseed = "' + "x" * 60000 + '"',  # an error that quotes 60 KB
    '[job]\nseed = ["' + "\U0001f600" * 15000 + '"]',
    "[job]\nname = 1979-05-27T07:32:00Z",
    "[job]\nseed = 1\nseed = 2",
    "\ufeff[job]\nname = 'bom'",
    "[[disclosure]]\n"
    + "value = 'eval_accuracy'\nto = ["
    + ",".join(['"data_owner"'] * 5000)
    + "]",
    "[[disclosure]]\nvalue = 'eval_accuracy'\nto = []",
    "[[disclosure]]\nvalue = 'train_outputs'\nto = ['dealer']",
    "[job]\nprovider = 'tfp'",
    "[job]\nmode = 'cma'\n[cma]\nintrinsic_dim = 0",
    "[model]\nattention = 'rfa'\nrfa_features = 0",
    "\x00",
    "",
]

#: Integers at and past the edges of TOML's 64-bit range and of protobuf's fields.
_EDGE_INTS = [0, -1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**40, -(10**40)]

#: TOML values to put in place of a valid one.
_TOML_VALUES = st.one_of(
    st.sampled_from(_EDGE_INTS).map(str),
    st.sampled_from(
        [
            "1e400",
            "-0.0",
            "nan",
            "inf",
            "-inf",
            "true",
            '""',
            "[]",
            "{}",
            "[[1]]",
            "{a = 1}",
            "1979-05-27",
            "'\\u0000'",
            '"rfa"',
            '"softmax"',
            '"sequence_classification"',
            '["data_owner", "model_owner"]',
            '["dealer"]',
        ]
    ),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    ODD_TEXT.map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)


@st.composite
def mutated_toml(draw: st.DrawFn, base: str) -> str:
    """``base`` (a valid job file) with a few of its values, lines or sections changed."""
    lines = base.splitlines()
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 4]))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["value", "value", "delete", "duplicate", "insert"]))
        if how == "value" and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {draw(_TOML_VALUES)}"
        elif how == "delete":
            del lines[i]
        elif how == "duplicate":
            lines.insert(i, lines[i])
        else:
            key = draw(
                st.sampled_from(
                    [
                        "steps",
                        "max_length",
                        "shots_per_class",
                        "eval_per_class",
                        "mode",
                        "attention",
                        "embedding",
                        "trainable",
                        "lora_modules",
                        "soft_prompt_length",
                        "target_epsilon",
                        "provider",
                        "transport",
                        "nosuchkey",
                    ]
                )
            )
            section = draw(
                st.sampled_from(["", "[zo]", "[cma]", "[dp]", "[run]", "[model]", "[data]"])
            )
            lines.insert(i, f"{section}\n{key} = {draw(_TOML_VALUES)}")
        if not lines:
            lines = [""]
    return "\n".join(lines) + "\n"


def _section_fields() -> dict[str, dict[str, Any]]:
    """Every section of a job file and its keys' types, read from the job contract itself."""
    hints = typing.get_type_hints(JobConfig)
    return {
        name: typing.get_type_hints(cls)
        for name, cls in hints.items()
        if dataclasses.is_dataclass(cls)
    }


_SECTIONS = _section_fields()
_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, float("inf"), float("-inf"), float("nan")]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_ANY = st.recursive(
    st.one_of(st.sampled_from(_EDGE_INTS), _FLOATS, st.booleans(), ODD_TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from("abc"), inner, max_size=3)
    ),
    max_leaves=6,
)


def _values_for(hint: Any) -> st.SearchStrategy[Any]:
    """Edge values of a key's own type (mostly), or of any type."""
    inner = [a for a in typing.get_args(hint) if a not in (type(None), Ellipsis)]
    if typing.get_origin(hint) is tuple:
        return st.lists(_values_for(inner[0]), max_size=5)
    if inner:  # an optional key
        return _values_for(inner[0])
    if hint is bool:
        own: st.SearchStrategy[Any] = st.booleans()
    elif hint is int:
        own = st.one_of(st.sampled_from(_EDGE_INTS), st.integers(-3, 600))
    elif hint is float:
        own = st.one_of(_FLOATS, st.integers(-3, 600))
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        own = st.sampled_from([str(m.value).lower() for m in hint])
    else:
        own = st.one_of(ODD_TEXT, st.sampled_from([r.value for r in Revealable]))
    return st.one_of(own, own, own, _ANY)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else repr(v)  # repr: 'inf', '-inf', '1e+300' are TOML floats
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):  # a TOML basic string: JSON's escapes, and DEL escaped too
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def typed_toml(draw: st.DrawFn, base: str) -> str:
    """``base`` with one to three keys of the job contract set to edge values: what reaches the
    typed checks and the commitments, rather than the TOML parser."""
    doc = tomllib.loads(base)
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(_SECTIONS)))
        key = draw(st.sampled_from(sorted(_SECTIONS[section])))
        doc.setdefault(section, {})[key] = draw(_values_for(_SECTIONS[section][key]))
    return to_toml(doc, _toml_value)


def job_tomls(base: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(base),
        *[typed_toml(base)] * 4,
        mutated_toml(base),
        st.sampled_from(HOSTILE_TOML),
        ODD_TEXT,
    )


class Valid:
    """The valid content a daemon of the deployment would accept, to mix into requests."""

    def __init__(self, *, proposal: pb.JobProposal, job_ids: list[str]) -> None:
        self.proposal = proposal
        self.job_ids = job_ids
        self.digests = [proposal.terms_digest, "0" * 64, "a" * 64]

    def job_id(self) -> st.SearchStrategy[str]:
        fresh = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=8)
        return st.one_of(
            st.sampled_from(self.job_ids),
            fresh.map(lambda s: "fz-" + s),
            st.sampled_from(ODD_IDS),
            ODD_TEXT,
        )

    def digest(self) -> st.SearchStrategy[str]:
        return st.one_of(
            st.sampled_from(self.digests),
            st.sampled_from(self.digests).map(lambda d: d + "\n"),
            st.sampled_from(self.digests).map(str.upper),
            ODD_TEXT,
        )


def _identity(v: Valid) -> st.SearchStrategy[pb.Identity]:
    return st.one_of(
        st.sampled_from(list(v.proposal.participants)),
        st.builds(
            pb.Identity,
            role=st.one_of(st.sampled_from([1, 2, 3, 4]), ENUM),
            party_id=st.one_of(
                st.sampled_from(["vendor", "hospital", "dealer", "alice", "vendor\n", "Vendor"]),
                ODD_TEXT,
            ),
        ),
    )


@st.composite
def _proposal(draw: st.DrawFn, v: Valid) -> pb.JobProposal:
    p = pb.JobProposal()
    p.CopyFrom(v.proposal)
    p.job_id = draw(v.job_id())
    for field in sorted(  # a set's order follows the process's hash seed: fixed here
        draw(
            st.sets(
                st.sampled_from(
                    [
                        "protocol_version",
                        "job_toml",
                        "terms",
                        "terms_digest",
                        "model",
                        "data",
                        "participants",
                    ]
                ),
                max_size=3,
            )
        )
    ):
        if field == "protocol_version":
            p.protocol_version = draw(st.one_of(st.just(2), UINT32))
        elif field == "job_toml":
            p.job_toml = draw(job_tomls(v.proposal.job_toml))
        elif field == "terms":
            del p.terms[:]
            for _ in range(draw(st.integers(0, 40))):
                p.terms.add(
                    value=draw(st.one_of(st.sampled_from([r.value for r in Revealable]), ODD_TEXT)),
                    to=draw(st.lists(st.one_of(st.sampled_from([1, 2, 3, 4]), ENUM), max_size=5)),
                )
        elif field == "terms_digest":
            p.terms_digest = draw(v.digest())
        elif field == "model":
            m = p.commitments.model
            m.model_type = draw(st.one_of(st.just("bert"), ODD_TEXT))
            m.weights_sha256 = draw(v.digest())
            m.dimensions.clear()
            m.dimensions.update(
                draw(st.dictionaries(ODD_TEXT, INT64, max_size=draw(st.sampled_from([3, 40]))))
            )
        elif field == "data":
            d = p.commitments.data
            d.rows, d.num_classes = draw(UINT64), draw(UINT32)
            del d.input_shape[:]
            d.input_shape.extend(draw(st.lists(UINT64, max_size=10)))
        else:
            del p.participants[:]
            p.participants.extend(draw(st.lists(_identity(v), max_size=5)))
    return p


@st.composite
def message(draw: st.DrawFn, method: str, v: Valid) -> Any:
    """A message of ``method``'s request type with drawn fields."""
    cls = METHODS[method]
    if method == "Hello":
        return cls(
            protocol_version=draw(st.one_of(st.just(1), UINT32)),
            identity=draw(_identity(v)),
            software_version=draw(ODD_TEXT),
            capabilities=draw(st.lists(ODD_TEXT, max_size=40)),
        )
    if method == "GetCommitment":
        return cls(job_toml=draw(job_tomls(v.proposal.job_toml)))
    if method == "Propose":
        return cls(proposal=draw(_proposal(v)))
    job_id = draw(v.job_id())
    if method == "Accept":
        return cls(job_id=job_id, terms_digest=draw(v.digest()), proposal_digest=draw(v.digest()))
    if method in ("Refuse", "Cancel"):
        reason = draw(st.one_of(ODD_TEXT, st.just("\u20ac" * 400)))
        return cls(job_id=job_id, reason=reason)
    if method == "WatchProgress":
        return cls(job_id=job_id, after_seq=draw(st.one_of(st.just(0), UINT64)))
    return cls(job_id=job_id)


@st.composite
def requests(draw: st.DrawFn, v: Valid) -> tuple[str, bytes]:
    """``(method, serialized request)``: generated, mutated, or random bytes."""
    # the two calls that parse job files (the most varied input) half of the time
    method = draw(st.sampled_from([*sorted(METHODS), *["GetCommitment", "Propose"] * 5]))
    kind = draw(st.sampled_from(["message", "message", "message", "mutated", "random"]))
    if kind == "random":
        return method, draw(st.binary(max_size=512))
    data = bytearray(draw(message(method, v)).SerializeToString())
    if kind == "mutated" and data:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            how = draw(st.sampled_from(["flip", "cut", "insert"]))
            if how == "flip":
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif how == "cut":
                del data[i:]
            else:
                data[i:i] = draw(st.binary(min_size=1, max_size=8))
            if not data:
                break
    return method, bytes(data)
