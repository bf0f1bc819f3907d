"""What ``secfwt bench`` runs: the sub-benchmark names and the plan of shapes and repetitions.

Kept apart from the cases so the CLI can parse names and ``--set`` overrides, and tests can build
plans, without importing the machinery that starts party processes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

from secfwt.bench.shapes import BERT_BASE, FULL_MODELS, MINILM, LayerShape
from secfwt.errors import ConfigError
from secfwt.models.spec import Pooling
from secfwt.mpc import device as mpc_device
from secfwt.overrides import apply_overrides


class BenchName(enum.Enum):
    FORWARD = "forward"
    ATTENTION = "attention"
    FOT_VS_BACKPROP = "fot-vs-backprop"
    FOT_VS_FULL_FT = "fot-vs-full-ft"
    VANILLA = "vanilla"
    TRANSPORT = "transport"
    DECODER = "decoder"
    SAFE_DELTA = "safe-delta"
    TIME_TO_TARGET = "time-to-target"


#: Run only when named: the packaged SmolLM2 in MPC takes minutes on its own; Safe Delta on
#: shares is a release step, not part of tuning.
_ON_REQUEST = frozenset({BenchName.DECODER, BenchName.SAFE_DELTA})


def parse_names(names: Sequence[str]) -> list[BenchName]:
    """Sub-benchmark names in suite order (when empty: all but those run only on request);
    ConfigError on an unknown name."""
    known = {b.value: b for b in BenchName}
    chosen = set()
    for n in names:
        if n not in known:
            raise ConfigError(
                f"bench: unknown sub-benchmark {n!r}; choose from: {', '.join(known)}"
            )
        chosen.add(known[n])
    if not chosen:
        return [b for b in BenchName if b not in _ON_REQUEST]
    return [b for b in BenchName if b in chosen]


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    """Every shape the suite runs; logged in full in the report."""

    quick: bool
    layer: LayerShape = BERT_BASE
    layer_seq_len: int = 128  # BERT-base layer: forward, vanilla
    minilm_seq_len: int = 128
    attention_seq_lens: tuple[int, ...] = (64, 128, 256, 512)
    attention_heads: int = 12
    attention_head_dim: int = 64
    fot_shape: LayerShape = MINILM
    fot_layers: int = 1  # trainable top layers (plus pooler and classifier)
    fot_batch: int = 4
    fot_seq_len: int = 128
    fot_directions: int = 1
    #: fot-vs-full-ft's ZO step with owner-held weights: LoRA rank on the top layers' query and
    #: value (the classifier trains with it)
    fot_lora_rank: int = 8
    #: fot-vs-full-ft: whole models (names of :data:`secfwt.bench.shapes.FULL_MODELS`) and
    #: lengths, one row each; batch, trainable top layers and directions as fot-vs-backprop.
    #: The default is what fits a 2-core machine; ``--set full_ft_models=minilm,bert-base --set
    #: full_ft_seq_lens=128,512`` runs every row the issue asks for.
    full_ft_models: tuple[str, ...] = ("minilm",)
    full_ft_seq_lens: tuple[int, ...] = (128,)
    #: fot-vs-full-ft's classifier input: ``cls`` (BERT's pooler on token 0: the top layer runs
    #: at that position alone on both sides) or ``mean`` (the default job's mean over tokens, no
    #: pooler: the top layer runs at every position)
    full_ft_pooling: Pooling = Pooling.CLS
    #: SecFwT's CMA-ES prompt tuning as in secfwt/jobs/prompt_tuning_rfa.toml (prompt at the
    #: top layer, whose weights, like the head's, stay with the model owner)
    cma_population: int = 8
    cma_prompt_length: int = 4
    cma_intrinsic_dim: int = 32
    #: time-to-target: MPC step costs at the default job's shapes (MiniLM, batch 48, T=32, 64
    #: directions, 48 training rows in chunks of 32); steps to +10 points from the plaintext
    #: twins, ZO at each seed, backprop SGD at the rates a plaintext sweep chose
    tta_model: str = "minilm"
    tta_batch: int = 48
    tta_seq_len: int = 32
    tta_directions: int = 64
    tta_prefix_rows: int = 48
    tta_prefix_chunk: int = 32
    tta_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tta_gain: float = 0.10
    tta_confirm: int = 5
    tta_lr_top: float = 0.1
    tta_lr_full: float = 0.05
    tta_max_steps: int = 100
    transport_shape: LayerShape = MINILM
    transport_seq_len: int = 64
    decoder_seq_lens: tuple[int, ...] = (64, 128)  # packaged SmolLM2, one row each
    #: forwards per length in one session: the first also sends every frozen weight's mask once,
    #: the fastest (a later one) is the steady cost of a frozen prefix
    decoder_reps: int = 2
    plaintext_reps: int = 20
    #: Repetitions of each measured section inside the same processes; the fastest counts.
    reps: int = 3
    step_reps: int = 1  # the tuning steps (long sections, less sensitive to short bursts)
    seed: int = 0
    timeout_s: float = 3600.0
    #: where every party process's ring products may run, as a job's ``run.device``: ``cpu``,
    #: ``cuda`` or ``cuda:N`` (:mod:`secfwt.mpc.device`)
    device: str = "cpu"

    @classmethod
    def full(cls) -> BenchPlan:
        return cls(quick=False)

    @classmethod
    def quick_plan(cls) -> BenchPlan:
        return cls(
            quick=True,
            layer_seq_len=64,
            minilm_seq_len=32,
            attention_seq_lens=(32, 64, 128),
            fot_layers=1,
            fot_batch=2,
            fot_seq_len=32,
            full_ft_seq_lens=(32,),
            transport_seq_len=32,
            decoder_seq_lens=(16,),
            plaintext_reps=10,
            reps=1,
            timeout_s=900.0,
        )

    def with_overrides(self, items: Sequence[str]) -> BenchPlan:
        """This plan with ``KEY=VALUE`` overrides of its numeric fields (``secfwt bench --set
        fot_seq_len=512``; lists as comma-separated integers), through the binder jobs use
        (:func:`secfwt.overrides.apply_overrides`). Raises :class:`ConfigError` naming the
        field and the fix for an unknown key or a bad value."""
        return apply_overrides(
            self,
            items,
            noun="plan",
            example="fot_seq_len=512",
            command="bench",
            fixed=_PLAN_FIXED,
            check=_plan_range,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("layer", "fot_shape", "transport_shape"):
            d[k] = getattr(self, k).describe()
        return {k: v.value if isinstance(v, enum.Enum) else v for k, v in d.items()}


#: Fields of the plan that ``--set`` cannot change: the layer shapes and the quick/full choice.
_PLAN_FIXED = ("quick", "layer", "fot_shape", "transport_shape")


def _plan_range(key: str, value: Any) -> str | None:
    """Every count and length is positive; the seed may be 0; model names are known."""
    if key == "device":
        try:
            mpc_device.check(value, field="device")
        except ConfigError as exc:
            return str(exc)
        return None
    if key == "tta_model":
        return None if value in FULL_MODELS else f"choose from: {', '.join(FULL_MODELS)}"
    if key == "full_ft_models":
        unknown = [v for v in value if v not in FULL_MODELS]
        if unknown or not value:
            return f"unknown model {unknown}; choose from: {', '.join(FULL_MODELS)}"
        return None
    if isinstance(value, enum.Enum):
        return None  # its choices were checked when it was read
    if isinstance(value, float):
        return None if value > 0 else "must be positive"
    lowest = 0 if key == "seed" else 1
    if any(v < lowest for v in (value if isinstance(value, tuple) else (value,))):
        return "must be >= 0" if lowest == 0 else "must be positive"
    return None


__all__ = ["BenchName", "BenchPlan", "parse_names"]
