"""Typed job configuration from TOML. Unknown keys and wrong types are errors that name the field.

A job file has the sections [job], [model], [data], [zo] or [cma], [run], [dp], an optional
[safety] and a list of [[disclosure]] terms. ``load_job`` reads a file (or the packaged default
job), applies ``--set section.key=value`` overrides, and validates everything that can be
checked before any party process starts.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib.resources
import json
import math
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from secfwt.data.datasets import DataSource
from secfwt.data.tables import check_columns
from secfwt.data.task import DataTask, PaddingSide, Truncation
from secfwt.errors import ConfigError
from secfwt.models.spec import Attention, EmbeddingMode, Head, Pooling
from secfwt.mpc import device as mpc_device
from secfwt.mpc.disclosure import DisclosureTerms, Revealable
from secfwt.mpc.provider import Provider
from secfwt.mpc.transport import Transport
from secfwt.overrides import apply_overrides, coerce, loads_toml, read_toml_text
from secfwt.roles import COMPUTING_ROLES, Role


class Mode(enum.Enum):
    """Forward-only tuning method."""

    ZO = "zo"  # zeroth-order SGD (SPSA / MeZO) on secret-shared parameters
    CMA = "cma"  # SecFwT black-box prompt tuning: CMA-ES on the data owner's low-dimensional z


@dataclasses.dataclass(frozen=True)
class JobSection:
    name: str = "job"
    seed: int = 0
    mode: Mode = Mode.ZO
    # ttp: a dealer process supplies triples (secure default); tfp: the model owner generates
    # them and learns the data owner's inputs (needs --insecure-dev).
    provider: Provider = Provider.TTP


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = "packaged:all-minilm-l6-v2"
    head: Head = Head.SEQUENCE_CLASSIFICATION
    pooling: Pooling = Pooling.MEAN
    attention: Attention = Attention.SOFTMAX
    embedding: EmbeddingMode = EmbeddingMode.TABLE_TO_DATA_OWNER
    max_length: int = 32
    rfa_features: int = 64
    rfa_sigma: float = 1.5
    # head = "causal_lm" only: the loss and the held-out loss count the last response_window
    # target positions of each (left-padded) row, which must hold its whole reply and
    # end-of-turn token. Public, like max_length: it fixes the cost, never a row's length.
    response_window: int = 0


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The data owner's examples; ``task`` decides which of the fields below apply."""

    task: DataTask = DataTask.CLASSIFICATION
    source: DataSource = DataSource.ROTTEN_TOMATOES
    path: str = ""
    # task = "classification": labelled texts, few-shot split per class
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    shots_per_class: int = 24
    eval_per_class: int = 30
    # task = "instructions": prompt -> reply pairs formatted with the model's chat template,
    # split so that no prompt is both trained on and held out
    prompt_column: str = "prompt"
    response_column: str = "response"
    system_column: str = ""  # "": no system column (the template's default system message)
    train_rows: int | None = None  # None: every pair whose prompt is not held out
    eval_rows: int = 100  # held-out pairs
    padding_side: PaddingSide = PaddingSide.RIGHT
    # Both tasks: an example longer than model.max_length is refused ("none"), cut at its end
    # ("end", classification), loses its prompt's first tokens ("prompt_left", instructions) or
    # is left out before the split ("drop", instructions). Unset: "end" for classification,
    # "none" for instructions.
    truncate: Truncation | None = None

    @property
    def truncation(self) -> Truncation:
        """The policy in force: the one set, else the task's default."""
        return self.truncate or Truncation.default_for(self.task)


@dataclasses.dataclass(frozen=True)
class ZOSection:
    """Zeroth-order SGD (SPSA, Spall 1992; MeZO, Malladi et al. 2023)."""

    trainable: tuple[str, ...] = ("classifier.*",)
    lora_modules: tuple[str, ...] = ()
    lora_rank: int = 4
    soft_prompt_length: int = 0
    prompt_layer: int = 0
    steps: int = 100
    lr: float = 0.15
    eps: float = 0.05
    batch_size: int = 48
    directions: int = 64


@dataclasses.dataclass(frozen=True)
class CMASection:
    """SecFwT / Black-Box Tuning (Sun et al. 2022): CMA-ES over z, prompt = A z."""

    intrinsic_dim: int = 32
    prompt_length: int = 4
    prompt_layer: int = 0
    population: int = 8
    sigma0: float = 1.0
    iterations: int = 10
    batch_size: int = 16


class AccountantName(enum.Enum):
    RDP = "rdp"  # Renyi DP of the subsampled Gaussian (Mironov et al. 2019), as Opacus computes it
    PRV = "prv"  # privacy random variables (Gopi et al. 2021): tighter, numerically composed


@dataclasses.dataclass(frozen=True)
class DPSection:
    """Differential privacy of what a job releases (final parameters) about its training rows.

    ``enabled`` turns a zeroth-order MPC job into DP-ZO (per-example clipping in MPC, Gaussian
    noise contributed by both computing parties). ``secfwt dp-baseline`` always uses these
    settings for its Opacus DP-SGD run. Give ``target_epsilon`` (the noise is calibrated to it),
    ``noise_multiplier`` (epsilon is reported), or both (a budget check).
    """

    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: AccountantName = AccountantName.RDP
    sample_rate: float | None = None  # Poisson sampling rate; default zo.batch_size / training rows
    # Opacus baseline SGD step size. 0.3 measured best of 0.01..2 at eps=8 on the packaged data,
    # head only (48 rows, rate 1, 100 steps; 200 rows, rate 0.16, 60 steps), over 4 to 8 noise
    # seeds.
    baseline_lr: float = 0.3
    baseline_steps: int | None = None  # Opacus baseline steps; default zo.steps
    checkpoint_every: int = 0  # Opacus baseline: steps between checkpoints (0: none)


@dataclasses.dataclass(frozen=True)
class SafetySection:
    """SWAT (arXiv 2410.04524) in a ZO job (:mod:`secfwt.tuning.swat`): for the
    first ``warmup_steps`` steps only the trainable tensors matching ``warmup_modules`` move;
    ``lr_multipliers`` scales each tensor's learning rate by the first pattern that matches it
    (1.0 when none does)."""

    warmup_steps: int = 0
    warmup_modules: tuple[str, ...] = ()
    lr_multipliers: tuple[tuple[str, float], ...] = ()  # a TOML table, kept in file order


@dataclasses.dataclass(frozen=True)
class SafetyGateSection:
    """The safety gate a causal-LM job carries (:mod:`secfwt.runtime.gate`): the refusal-margin
    score (:mod:`secfwt.data.refusal_margin`) on public harmful prompts, computed in MPC before
    and after tuning; the tuned parameters are released only if the score after tuning passes.
    ``prompts = ""`` (the default): no gate. A model owner's ``[safety_policy]``
    (:mod:`secfwt.runtime.policy`) says which gate, and which defences, its jobs must carry."""

    prompts: str = ""  # "packaged:advbench-gate", or a .txt / .jsonl file of harmful prompts
    count: int = 8  # prompts scored (each is 6 rows: 3 refusals, 3 compliances)
    max_length: int = 64  # tokens per score row (a longer prompt loses its first tokens)
    #: release only if score_after >= score_before - max_drop (the untuned model's score, same job)
    max_drop: float | None = None
    min_score: float | None = None  # and score_after >= min_score
    #: Safe Delta on shares before release (:mod:`secfwt.runtime.safe_delta`): the LoRA deltas
    #: are corrected in MPC with the model owner's calibration Hessians, the gate scores the
    #: corrected model and only the corrected deltas can be released
    safe_delta: bool = False
    #: the paper's s (Lu et al. 2025); = secfwt.tuning.safe_delta.DEFAULT_BUDGET (a test checks)
    safe_delta_budget: float = 0.1
    #: calibration samples (harmful request + refusal) of the model owner's Hessians
    safe_delta_calibration: int = 32

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def digest_form(self) -> dict[str, Any]:
        """The section as digests hash it: without Safe Delta's settings when it is off (they
        are refused then), so a gated job's digests are those it had before they existed."""
        form = dataclasses.asdict(self)
        if not self.safe_delta:
            del form["safe_delta_budget"], form["safe_delta_calibration"]
        return form

    def passes(self, before: float, after: float) -> tuple[bool, str]:
        """Whether scores ``before`` and ``after`` tuning pass, and why (one line)."""
        why = []
        if self.max_drop is not None and after < before - self.max_drop:
            why.append(
                f"score fell {before - after:.4f} (from {before:.4f} to {after:.4f}), "
                f"more than max_drop = {self.max_drop}"
            )
        if self.min_score is not None and after < self.min_score:
            why.append(f"score {after:.4f} is below min_score = {self.min_score}")
        if why:
            return False, "; ".join(why)
        return True, f"score {before:.4f} -> {after:.4f} within the gate"


@dataclasses.dataclass(frozen=True)
class RunSection:
    timeout_s: float = 1800.0
    output_dir: str = "secfwt-runs"
    eval_batch: int = 32
    # MPC transport between the party processes. "gloo" (plaintext torch.distributed) is fine for
    # `secfwt simulate` on loopback; "tls" runs the same job over mutually authenticated TLS gRPC
    # streams, as the daemons do between hosts.
    transport: Transport = Transport.GLOO
    # Where each party process's ring products run (secfwt.mpc.device): "cpu", or "cuda" /
    # "cuda:N" for the exact float64 limb GEMMs on that GPU, shares staying in host memory.
    device: str = "cpu"


@dataclasses.dataclass(frozen=True)
class DisclosureEntry:
    value: Revealable
    to: tuple[Role, ...]


@dataclasses.dataclass(frozen=True)
class JobConfig:
    job: JobSection = JobSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    zo: ZOSection = ZOSection()
    cma: CMASection = CMASection()
    run: RunSection = RunSection()
    dp: DPSection = DPSection()
    safety: SafetySection = SafetySection()
    safety_gate: SafetyGateSection = SafetyGateSection()
    disclosure: tuple[DisclosureEntry, ...] = ()
    source: str = "<built-in>"

    @property
    def terms(self) -> DisclosureTerms:
        """The disclosure list, bound to the job's safety policy (its gate and its SWAT
        schedule) when it carries a gate: both owners accept that digest."""
        policy = safety_policy_digest(self) if self.safety_gate.enabled else ""
        return DisclosureTerms.of(((d.value, d.to) for d in self.disclosure), policy=policy)


def safety_policy_digest(cfg: JobConfig) -> str:
    """SHA-256 of the job's [safety_gate] and [safety] sections: the safety policy it carries."""
    blob = {
        "safety_gate": cfg.safety_gate.digest_form(),
        "safety": dataclasses.asdict(cfg.safety),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


_SECTIONS = {
    "job": JobSection,
    "model": ModelSection,
    "data": DataSection,
    "zo": ZOSection,
    "cma": CMASection,
    "run": RunSection,
    "dp": DPSection,
    "safety": SafetySection,
    "safety_gate": SafetyGateSection,
}


#: Fields of a job that ``--set`` cannot change: the terms are agreed in the file, whose name
#: ``source`` records.
_FIXED = ("disclosure", "source")


def default_job_text() -> str:
    return (
        importlib.resources.files("secfwt.jobs")
        .joinpath("default.toml")
        .read_text(encoding="utf-8")
    )


def load_job(path: str | Path | None, *, overrides: Iterable[str] = ()) -> JobConfig:
    """Read and validate a job file (None: the packaged default job).

    ``overrides`` are ``SECTION.KEY=VALUE`` items (``--set``), applied to the parsed file before
    the cross-field checks, with the syntax and errors of :func:`secfwt.overrides.apply_overrides`.
    """
    if path is None:
        text, where = default_job_text(), "<built-in default job>"
    else:
        p = Path(path)
        text, where = read_toml_text(p, what="job file"), str(p)
    cfg = parse_job(loads_toml(text, where=where), where=where)
    cfg = apply_overrides(cfg, overrides, noun="job", example="zo.steps=10", fixed=_FIXED)
    validate(cfg)
    return cfg


def parse_job(raw: dict[str, Any], *, where: str) -> JobConfig:
    known = set(_SECTIONS) | {"disclosure"}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown section [{key}]; valid sections: {', '.join(sorted(known))}"
            )
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        kwargs[name] = build_section(cls, table, f"{where}: [{name}]")
    entries = raw.get("disclosure", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: disclosure must be a list of [[disclosure]] tables")
    kwargs["disclosure"] = tuple(
        build_section(DisclosureEntry, e, f"{where}: [[disclosure]] #{i + 1}")
        for i, e in enumerate(entries)
    )
    return JobConfig(**kwargs, source=where)


def section_values(cls: type, table: Any, where: str) -> dict[str, Any]:
    """The keys of the TOML table ``table`` as the types of dataclass ``cls``'s fields; a
    :class:`ConfigError` naming ``where`` and the key for an unknown key or a wrong type. Missing
    keys are the caller's (:func:`build_section` refuses them)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    for key in table:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(fields)}")
    return {key: coerce(value, hints[key], f"{where} {key}") for key, value in table.items()}


def build_section(cls: type, table: Any, where: str) -> Any:
    """Dataclass ``cls`` from the TOML table ``table`` (:func:`section_values`), refusing a
    missing key that has no default."""
    values = section_values(cls, table, where)
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    return cls(**values)


def _positive(where: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where} = {value}: must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that need no model or data."""
    s = cfg.source
    _positive(f"{s}: model.max_length", cfg.model.max_length)
    if cfg.model.max_length < 2:
        raise ConfigError(
            f"{s}: model.max_length = {cfg.model.max_length}: needs room for at least one token "
            "besides [CLS]"
        )
    _positive(f"{s}: model.rfa_features", cfg.model.rfa_features)
    _positive(f"{s}: model.rfa_sigma", cfg.model.rfa_sigma)
    validate_data(cfg.data, where=s)
    _positive(f"{s}: run.timeout_s", cfg.run.timeout_s)
    _positive(f"{s}: run.eval_batch", cfg.run.eval_batch)
    mpc_device.check(cfg.run.device, source=s)
    _validate_head(cfg)
    _validate_gate(cfg)
    if cfg.job.mode is Mode.ZO:
        z = cfg.zo
        for name in ("steps", "batch_size", "directions", "lr", "eps", "lora_rank"):
            _positive(f"{s}: zo.{name}", getattr(z, name))
        _positive(f"{s}: zo.soft_prompt_length", z.soft_prompt_length, allow_zero=True)
        _positive(f"{s}: zo.prompt_layer", z.prompt_layer, allow_zero=True)
        if not (z.trainable or z.lora_modules or z.soft_prompt_length):
            raise ConfigError(
                f"{s}: [zo] trains nothing: set zo.trainable, zo.lora_modules or "
                "zo.soft_prompt_length"
            )
    else:
        c = cfg.cma
        for name in (
            "intrinsic_dim",
            "prompt_length",
            "population",
            "sigma0",
            "iterations",
            "batch_size",
        ):
            _positive(f"{s}: cma.{name}", getattr(c, name))
        _positive(f"{s}: cma.prompt_layer", c.prompt_layer, allow_zero=True)
        if c.population < 2:
            raise ConfigError(
                f"{s}: cma.population = {c.population}: CMA-ES needs at least 2 candidates per "
                "iteration"
            )
    _validate_dp(cfg)
    _validate_safety(cfg)
    for entry in cfg.disclosure:
        for r in entry.to:
            if r not in COMPUTING_ROLES:
                raise ConfigError(
                    f"{s}: [[disclosure]] {entry.value.value}: the dealer never receives values; "
                    "use model_owner or data_owner"
                )
    missing: dict[Revealable, list[str]] = {}
    for value, to in required_disclosures(cfg):
        if not cfg.terms.allows(value, to):
            missing.setdefault(value, []).append(to.value)
    if missing:  # the first reveal missing, with every party it goes to
        value, roles = next(iter(missing.items()))
        who = ", ".join(f'"{r}"' for r in sorted(roles))
        raise ConfigError(
            f"{s}: this job reveals {value.value} to {' and '.join(sorted(roles))} but the "
            f"[[disclosure]] list does not allow it ({value.description}); "
            f'add [[disclosure]] value = "{value.value}" to = [{who}] if both owners agree'
        )


#: The [data] fields of one task only, and the task each belongs to.
_TASK_FIELDS = {
    DataTask.CLASSIFICATION: (
        "text_column",
        "label_column",
        "labels",
        "shots_per_class",
        "eval_per_class",
    ),
    DataTask.INSTRUCTIONS: (
        "prompt_column",
        "response_column",
        "system_column",
        "train_rows",
        "eval_rows",
        "padding_side",
    ),
}
_TASK_SOURCES = {
    DataTask.CLASSIFICATION: (DataSource.ROTTEN_TOMATOES, DataSource.CSV, DataSource.JSONL),
    DataTask.INSTRUCTIONS: (DataSource.CHATTERBOT, DataSource.CSV, DataSource.JSONL),
}
_PACKAGED_SOURCES = (DataSource.ROTTEN_TOMATOES, DataSource.CHATTERBOT)


def validate_data(d: DataSection, *, where: str) -> None:
    """The [data] checks that need no file: the fields fit the task and each other."""
    s, task = where, d.task
    if d.source not in _TASK_SOURCES[task]:
        other = next(t for t in DataTask if d.source in _TASK_SOURCES[t])
        choices = ", ".join(repr(x.value) for x in _TASK_SOURCES[task])
        raise ConfigError(
            f"{s}: data.source = {d.source.value!r} is data for data.task = {other.value!r}, not "
            f"{task.value!r}; set data.task = {other.value!r}, or data.source to one of {choices}"
        )
    default = DataSection()
    for other, fields in _TASK_FIELDS.items():
        if other is task:
            continue
        for name in fields:
            if getattr(d, name) != getattr(default, name):
                raise ConfigError(
                    f"{s}: data.{name} applies only to data.task = {other.value!r}, not "
                    f"{task.value!r}; remove it"
                )
    if d.source in _PACKAGED_SOURCES and d.path:
        raise ConfigError(
            f"{s}: data.path = {d.path!r} is not used with data.source = {d.source.value!r} (a "
            "packaged dataset); remove data.path, or set data.source = 'csv' or 'jsonl'"
        )
    if d.source not in _PACKAGED_SOURCES and not d.path:
        raise ConfigError(f"{s}: data.path is required when data.source = {d.source.value!r}")
    allowed = (
        (Truncation.NONE, Truncation.END)
        if task is DataTask.CLASSIFICATION
        else (Truncation.NONE, Truncation.PROMPT_LEFT, Truncation.DROP)
    )
    if d.truncation not in allowed:
        why = "it would cut the reply" if task is DataTask.INSTRUCTIONS else "there is no prompt"
        raise ConfigError(
            f"{s}: data.truncate = {d.truncation.value!r} does not apply to data.task = "
            f"{task.value!r} ({why}); use one of {[a.value for a in allowed]}"
        )
    if task is DataTask.CLASSIFICATION:
        _positive(f"{s}: data.shots_per_class", d.shots_per_class)
        _positive(f"{s}: data.eval_per_class", d.eval_per_class)
        return
    try:
        columns = {"data.prompt_column": d.prompt_column, "data.response_column": d.response_column}
        if d.system_column:
            columns["data.system_column"] = d.system_column
        check_columns(columns)
    except ConfigError as exc:
        raise ConfigError(f"{s}: {exc}") from None
    _positive(f"{s}: data.eval_rows", d.eval_rows, allow_zero=True)
    if d.train_rows is not None:
        _positive(f"{s}: data.train_rows", d.train_rows)


#: The data task each tuning head learns from.
_HEAD_TASKS = {
    Head.SEQUENCE_CLASSIFICATION: DataTask.CLASSIFICATION,
    Head.CAUSAL_LM: DataTask.INSTRUCTIONS,
}


def _validate_head(cfg: JobConfig) -> None:
    """The head fits the data task, and a causal-LM job's window, layout and method fit it."""
    s, m = cfg.source, cfg.model
    task = _HEAD_TASKS.get(m.head)
    if task is None:
        raise ConfigError(
            f"{s}: model.head = {m.head.value!r}: tuning jobs need 'sequence_classification' or "
            "'causal_lm' (verify-model checks the other heads)"
        )
    if cfg.data.task is not task:
        head = next(h for h, t in _HEAD_TASKS.items() if t is cfg.data.task)
        raise ConfigError(
            f"{s}: model.head = {m.head.value!r} learns from data.task = {task.value!r}, not "
            f"{cfg.data.task.value!r}; set data.task = {task.value!r}, or model.head = "
            f"{head.value!r}"
        )
    if m.head is not Head.CAUSAL_LM:
        if m.response_window:
            raise ConfigError(
                f"{s}: model.response_window applies only to model.head = 'causal_lm'; remove it"
            )
        return
    if not 1 <= m.response_window < m.max_length:
        raise ConfigError(
            f"{s}: model.response_window = {m.response_window}: a causal_lm job needs "
            f"1 <= response_window < model.max_length = {m.max_length} (the last positions of "
            "each row that hold its reply and end-of-turn token)"
        )
    if cfg.data.padding_side is not PaddingSide.LEFT:
        raise ConfigError(
            f"{s}: data.padding_side = {cfg.data.padding_side.value!r}: a causal_lm job lays rows "
            "out left-padded, so that every reply ends at the last position and the response "
            "window is the same public positions for all rows; set data.padding_side = 'left'"
        )
    if m.attention is not Attention.SOFTMAX:
        raise ConfigError(
            f"{s}: model.attention = {m.attention.value!r}: causal_lm jobs run softmax "
            "attention; set model.attention = 'softmax'"
        )
    if cfg.job.mode is not Mode.ZO:
        raise ConfigError(
            f"{s}: job.mode = {cfg.job.mode.value!r}: causal_lm jobs tune with job.mode = 'zo' "
            "(CMA prompt search would reveal vocabulary-wide logits to the data owner)"
        )
    p = cfg.zo.soft_prompt_length
    if p and p + m.response_window >= m.max_length:
        raise ConfigError(
            f"{s}: zo.soft_prompt_length = {p}: in a causal_lm job the prompt's positions come "
            f"out of model.max_length = {m.max_length}, which must then still hold the response "
            f"window of {m.response_window} and one more token; raise model.max_length or "
            "shorten the prompt"
        )


def _validate_dp(cfg: JobConfig) -> None:
    """DP settings that are wrong whatever the data; checks that need the row count live in
    :func:`secfwt.tuning.accounting.plan` and run before any party starts."""
    s, d = cfg.source, cfg.dp
    if d.target_epsilon is not None and d.target_epsilon <= 0:
        raise ConfigError(
            f"{s}: dp.target_epsilon = {d.target_epsilon}: must be > 0 (smaller is more private; "
            "typical values 1 to 10)"
        )
    if d.noise_multiplier is not None and d.noise_multiplier <= 0:
        raise ConfigError(f"{s}: dp.noise_multiplier = {d.noise_multiplier}: must be > 0")
    if not 0 < d.delta < 1:
        raise ConfigError(
            f"{s}: dp.delta = {d.delta}: must be in (0, 1) and below 1 / (training rows)"
        )
    _positive(f"{s}: dp.max_grad_norm", d.max_grad_norm)
    _positive(f"{s}: dp.baseline_lr", d.baseline_lr)
    _positive(f"{s}: dp.checkpoint_every", d.checkpoint_every, allow_zero=True)
    if d.baseline_steps is not None:
        _positive(f"{s}: dp.baseline_steps", d.baseline_steps)
    if d.sample_rate is not None and not 0 < d.sample_rate <= 1:
        raise ConfigError(
            f"{s}: dp.sample_rate = {d.sample_rate}: a Poisson sampling rate must be in (0, 1]"
        )
    if not d.enabled:
        return
    if d.target_epsilon is None and d.noise_multiplier is None:
        raise ConfigError(
            f"{s}: [dp] enabled needs dp.target_epsilon (noise calibrated to it) or "
            "dp.noise_multiplier"
        )
    if cfg.job.mode is not Mode.ZO:
        raise ConfigError(
            f"{s}: dp.enabled = true needs job.mode = 'zo' (DP zeroth-order updates); CMA prompt "
            "search reveals per-candidate outputs to the data owner"
        )
    for entry in cfg.disclosure:
        if (
            entry.value in (Revealable.TRAIN_LOSS, Revealable.TRAIN_OUTPUTS)
            and Role.MODEL_OWNER in entry.to
        ):
            raise ConfigError(
                f"{s}: [[disclosure]] {entry.value.value} to model_owner: with dp.enabled the "
                "model owner may only receive the "
                "noised result; training losses or outputs are not covered by the DP guarantee. "
                "Reveal them to data_owner only"
            )


def _validate_gate(cfg: JobConfig) -> None:
    """[safety_gate] settings that are wrong whatever the model and prompts."""
    s, g = cfg.source, cfg.safety_gate
    if g == SafetyGateSection():
        return
    if not g.enabled:
        raise ConfigError(
            f"{s}: safety_gate.prompts: [safety_gate] is set but names no prompts; set "
            "safety_gate.prompts = 'packaged:advbench-gate' (or a prompt file), or remove the "
            "section"
        )
    _validate_safe_delta(cfg)
    if cfg.model.head is not Head.CAUSAL_LM:
        raise ConfigError(
            f"{s}: safety_gate: the safety gate scores a chat model's replies; it needs "
            f"model.head = 'causal_lm', not {cfg.model.head.value!r}. Remove [safety_gate]"
        )
    if g.max_drop is None and g.min_score is None:
        raise ConfigError(
            f"{s}: safety_gate.max_drop: a gate needs a threshold; set safety_gate.max_drop "
            "(how far the score may fall during tuning) and/or safety_gate.min_score"
        )
    if g.max_drop is not None:
        _positive(f"{s}: safety_gate.max_drop", g.max_drop, allow_zero=True)
    _positive(f"{s}: safety_gate.count", g.count)
    if g.max_length < 16:
        raise ConfigError(
            f"{s}: safety_gate.max_length = {g.max_length}: a score row holds the chat template, "
            "a prompt and an opening; use at least 16 (64 fits most harmful requests)"
        )


def _validate_safe_delta(cfg: JobConfig) -> None:
    """``safety_gate.safe_delta``: a ZO causal-LM job with LoRA on the TTP provider (the owned
    products on shares need the dealer); the trainables are checked against the model by
    :func:`secfwt.tuning.trainable.trainable_set`."""
    s, g = cfg.source, cfg.safety_gate
    if not g.safe_delta:
        if (g.safe_delta_budget, g.safe_delta_calibration) != (
            SafetyGateSection.safe_delta_budget,
            SafetyGateSection.safe_delta_calibration,
        ):
            raise ConfigError(
                f"{s}: safety_gate.safe_delta_budget / safe_delta_calibration are set but "
                "safety_gate.safe_delta = false; set safety_gate.safe_delta = true or remove them"
            )
        return
    where = f"{s}: safety_gate.safe_delta = true"
    if cfg.model.head is not Head.CAUSAL_LM or cfg.job.mode is not Mode.ZO:
        raise ConfigError(
            f"{where}: Safe Delta corrects the LoRA deltas of a causal-LM ZO job; it needs "
            "model.head = 'causal_lm' and job.mode = 'zo'. Set safety_gate.safe_delta = false"
        )
    if cfg.job.provider is not Provider.TTP:
        raise ConfigError(
            f"{where}: Safe Delta on shares needs the dealer's products (job.provider = 'ttp'), "
            f"not {cfg.job.provider.value!r}"
        )
    if not cfg.zo.lora_modules:
        raise ConfigError(
            f"{where}: the job tunes no LoRA (zo.lora_modules is empty), so there is no Linear "
            "delta to correct; add zo.lora_modules or set safety_gate.safe_delta = false"
        )
    if cfg.zo.soft_prompt_length:
        raise ConfigError(
            f"{where}: a soft prompt is not a Linear weight and Safe Delta cannot correct it; set "
            "zo.soft_prompt_length = 0 or safety_gate.safe_delta = false"
        )
    b = g.safe_delta_budget
    if isinstance(b, bool) or not (0 < b < math.inf):
        raise ConfigError(
            f"{s}: safety_gate.safe_delta_budget = {b!r}: must be a finite number > 0 (the "
            "paper's s; 0.1 keeps most of a benign delta)"
        )
    c = g.safe_delta_calibration
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ConfigError(
            f"{s}: safety_gate.safe_delta_calibration = {c!r}: must be an integer >= 1 (the "
            "calibration samples of the model owner's Hessians; 32 by default)"
        )


def _validate_safety(cfg: JobConfig) -> None:
    """[safety] settings that are wrong whatever the model; patterns are matched against the
    trainable set by :func:`secfwt.tuning.swat.update_scales`."""
    s, f = cfg.source, cfg.safety
    if f == SafetySection():
        return
    if cfg.job.mode is not Mode.ZO:
        key = next(k.name for k in dataclasses.fields(f) if getattr(f, k.name))
        raise ConfigError(
            f"{s}: safety.{key}: [safety] shapes zeroth-order updates; job.mode = "
            f"{cfg.job.mode.value!r} has none. Remove [safety] or set job.mode = 'zo'"
        )
    _positive(f"{s}: safety.warmup_steps", f.warmup_steps, allow_zero=True)
    if f.warmup_steps and not f.warmup_modules:
        raise ConfigError(
            f"{s}: safety.warmup_modules: safety.warmup_steps = {f.warmup_steps} needs the "
            "patterns of the modules that train during the warm-up"
        )
    if f.warmup_modules and not f.warmup_steps:
        raise ConfigError(
            f"{s}: safety.warmup_steps: safety.warmup_modules is set but the warm-up lasts 0 "
            "steps; set safety.warmup_steps > 0 or remove safety.warmup_modules"
        )
    if f.warmup_steps >= cfg.zo.steps:
        raise ConfigError(
            f"{s}: safety.warmup_steps = {f.warmup_steps}: the warm-up must end before "
            f"zo.steps = {cfg.zo.steps}, or the other tensors never train"
        )
    for pattern, m in f.lr_multipliers:
        if not m > 0:  # finite already (coerce)
            raise ConfigError(f"{s}: safety.lr_multipliers.{pattern} = {m}: must be > 0")
        if cfg.dp.enabled and m > 1:
            raise ConfigError(
                f"{s}: safety.lr_multipliers.{pattern} = {m}: with dp.enabled multipliers must "
                "be <= 1, so that zo.lr stays the largest step any tensor takes; raise zo.lr "
                "instead"
            )


def required_disclosures(cfg: JobConfig) -> list[tuple[Revealable, Role]]:
    """Reveals the job cannot run without (others, e.g. train_loss, are optional)."""
    causal = cfg.model.head is Head.CAUSAL_LM
    evaluation = Revealable.EVAL_LOSS if causal else Revealable.EVAL_ACCURACY
    out: list[tuple[Revealable, Role]] = [(evaluation, Role.DATA_OWNER)]
    # every job: both parties compute again a row whose secure values failed the range check (a
    # fixed-point truncation failure, secfwt.runtime.range_checks), so both learn that bit
    out += [(Revealable.RANGE_CHECK, r) for r in (Role.MODEL_OWNER, Role.DATA_OWNER)]
    if cfg.model.embedding is EmbeddingMode.TABLE_TO_DATA_OWNER:
        out.append((Revealable.EMBEDDING_TABLE, Role.DATA_OWNER))
    if cfg.job.mode is Mode.CMA:
        out.append((Revealable.TRAIN_OUTPUTS, Role.DATA_OWNER))
    if cfg.safety_gate.enabled:  # both owners see the score and the reason of the decision
        out += [(Revealable.SAFETY_SCORE, r) for r in (Role.MODEL_OWNER, Role.DATA_OWNER)]
    return out
