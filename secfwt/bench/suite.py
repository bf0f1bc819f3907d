"""``secfwt bench``: the benchmark suite, run in one process tree on one machine.

Every sub-benchmark starts real party processes (model owner, data owner, dealer; TTP provider;
gloo on loopback unless it compares transports) through :func:`secfwt.mpc.launcher.run_parties`
and collects per party: wall time of the measured section, bytes sent and received, rounds,
dealer traffic, peak RSS (:mod:`secfwt.bench.probe`). Link times are projected with
:func:`secfwt.bench.metrics.project` (modelled, not measured under an emulated link).

Sub-benchmarks (:class:`BenchName`) and what they compare:

* ``forward``: plaintext torch vs secfwt's secure forward of a BERT-base-shaped layer
  (softmax and RFA attention) and of the packaged MiniLM (all 6 layers, softmax);
* ``attention``: the softmax vs the RFA attention core in MPC across sequence lengths, with the
  least-squares growth exponents of time and bytes;
* ``fot-vs-backprop``: one secfwt SPSA step vs one CrypTen autograd + SGD step, same layers,
  batch, sequence length and trainable parameters (see :func:`_fot_vs_backprop`);
* ``vanilla``: the BERT-base-shaped layer in vanilla CrypTen 0.4.1 vs secfwt's engine;
* ``transport``: the same secure layer over gloo and over the TLS mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from secfwt.bench import metrics
from secfwt.bench.shapes import (
    BERT_BASE,
    MINILM,
    LayerShape,
    hidden_states,
    layer_names,
    synthetic_model,
    time_plaintext,
)
from secfwt.errors import ConfigError
from secfwt.models.spec import Attention, Head
from secfwt.overrides import apply_overrides
from secfwt.roles import Role

log = logging.getLogger(__name__)


class BenchName(enum.Enum):
    FORWARD = "forward"
    ATTENTION = "attention"
    FOT_VS_BACKPROP = "fot-vs-backprop"
    VANILLA = "vanilla"
    TRANSPORT = "transport"


def parse_names(names: Sequence[str]) -> list[BenchName]:
    """Sub-benchmark names in suite order (all when empty); ConfigError on an unknown name."""
    known = {b.value: b for b in BenchName}
    chosen = set()
    for n in names:
        if n not in known:
            raise ConfigError(
                f"bench: unknown sub-benchmark {n!r}; choose from: {', '.join(known)}"
            )
        chosen.add(known[n])
    return [b for b in BenchName if b in chosen] if chosen else list(BenchName)


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
    transport_shape: LayerShape = MINILM
    transport_seq_len: int = 64
    plaintext_reps: int = 20
    #: Repetitions of each measured section inside the same processes; the fastest counts.
    reps: int = 3
    step_reps: int = 1  # the tuning steps (long sections, less sensitive to short bursts)
    seed: int = 0
    timeout_s: float = 3600.0

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
            transport_seq_len=32,
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
        return d


#: Fields of the plan that ``--set`` cannot change: the layer shapes and the quick/full choice.
_PLAN_FIXED = ("quick", "layer", "fot_shape", "transport_shape")


def _plan_range(key: str, value: Any) -> str | None:
    """Every count and length is positive; the seed may be 0."""
    lowest = 0 if key == "seed" else 1
    if any(v < lowest for v in (value if isinstance(value, tuple) else (value,))):
        return "must be >= 0" if lowest == 0 else "must be positive"
    return None


# -- running cases ------------------------------------------------------------------------------


class Runner:
    """Runs cases in party processes, memoises them within one suite run, reports progress."""

    def __init__(
        self,
        plan: BenchPlan,
        *,
        on_case: Callable[[str], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.plan = plan
        self.on_case = on_case or (lambda label: None)
        self.timeout_s = timeout_s or plan.timeout_s
        self._memo: dict[str, dict[str, Any]] = {}

    def run(
        self,
        key: str,
        label: str,
        *,
        model_owner: dict[str, Any],
        data_owner: dict[str, Any],
        common: dict[str, Any],
        transport: Any = None,
        vanilla: bool = False,
    ) -> dict[str, Any]:
        """Run one case (or return its result from earlier in this suite run)."""
        if key in self._memo:
            return self._memo[key]
        from secfwt.bench.party import bench_party
        from secfwt.bench.vanilla import vanilla_engine_env
        from secfwt.mpc.launcher import run_parties
        from secfwt.mpc.provider import Provider
        from secfwt.mpc.transport import Transport

        self.on_case(label)
        env = vanilla_engine_env() if vanilla else contextlib.nullcontext()
        t0 = time.perf_counter()
        with env:
            res = run_parties(
                bench_party,
                payloads={
                    Role.MODEL_OWNER: {**common, **model_owner, "vanilla": vanilla},
                    Role.DATA_OWNER: {**common, **data_owner, "vanilla": vanilla},
                },
                provider=Provider.TTP,
                timeout_s=self.timeout_s,
                transport=transport or Transport.GLOO,
            )
        out = {
            "label": label,
            "process_wall_s": time.perf_counter() - t0,
            "values": {r: res[r].value for r in (Role.MODEL_OWNER, Role.DATA_OWNER)},
        }
        self._memo[key] = out
        return out


def summarise(
    costs: dict[Role, dict[str, Any]], rss: dict[Role, float] | None = None
) -> dict[str, Any]:
    """Per-party costs, totals and link projections of one measured section."""
    parties = {r.value: {**c, **({"peak_rss_mb": rss[r]} if rss else {})} for r, c in costs.items()}
    pc = [metrics.PartyCost.from_dict(c) for c in costs.values()]
    return {
        "parties": parties,
        "time_s": max(p.wall_s for p in pc),
        "bytes_sent_total": sum(p.bytes_sent for p in pc),
        "dealer_bytes": sum(p.dealer_bytes for p in pc),
        "rounds": max(p.rounds for p in pc),
        "projected_s": metrics.projections(pc),
    }


def best_rep(costs: dict[Role, list[dict[str, Any]]]) -> int:
    """Index of the repetition whose slower party was fastest."""
    n = min(len(c) for c in costs.values())
    return min(range(n), key=lambda i: max(c[i]["wall_s"] for c in costs.values()))


def _pick(
    costs: dict[Role, list[dict[str, Any]]], rss: dict[Role, float] | None = None
) -> dict[str, Any]:
    i = best_rep(costs)
    chosen = {r: {k: v for k, v in c[i].items() if k != "breakdown"} for r, c in costs.items()}
    s = summarise(chosen, rss)
    s["reps"] = len(next(iter(costs.values())))
    s["time_s_all_reps"] = [max(c[j]["wall_s"] for c in costs.values()) for j in range(s["reps"])]
    # the first repetition also pays one-time costs (e.g. frozen weights' masks, sent once)
    s["first_rep"] = {
        "time_s": s["time_s_all_reps"][0],
        "bytes_sent_total": sum(c[0]["bytes_sent"] for c in costs.values()),
    }
    if "breakdown" in costs[Role.MODEL_OWNER][i]:
        s["breakdown"] = costs[Role.MODEL_OWNER][i][
            "breakdown"
        ]  # the model owner's view (it also waits for the dealer)
    return s


def _case_summary(result: dict[str, Any]) -> dict[str, Any]:
    vals = result["values"]
    s = _pick(
        {r: v["costs"] for r, v in vals.items()}, {r: v["peak_rss_mb"] for r, v in vals.items()}
    )
    s["label"] = result["label"]
    return s


def _max_err(secure: torch.Tensor | None, ref: torch.Tensor) -> float | None:
    if secure is None:
        return None
    return float((secure.double() - ref.double()).abs().max())


# -- sub-benchmarks -----------------------------------------------------------------------------


class _Layer:
    """The BERT-base-shaped layer every layer comparison uses (built once per suite run)."""

    def __init__(self, plan: BenchPlan, shape: LayerShape, seq_len: int) -> None:
        self.shape, self.seq_len, self.reps = shape, seq_len, plan.reps
        self.spec, self.state, self.hf = synthetic_model(
            shape, layers=1, head=Head.BASE, seed=plan.seed
        )
        self.x = hidden_states(batch=1, seq_len=seq_len, hidden=shape.hidden, seed=plan.seed + 1)
        self.names = layer_names(self.spec, 0)

    def reference(self, attention: Attention) -> torch.Tensor:
        """float64 plaintext of the same function (secfwt's encoder on PlainOps)."""
        from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
        from secfwt.models.ops import PlainOps

        model = EncoderModel(
            self.spec, plain_params(self.state), PlainOps(), ForwardSettings(attention=attention)
        )
        return model.block(self.x.double(), torch.ones(1, self.seq_len, dtype=torch.float64), 0)

    def run(
        self, runner: Runner, *, engine: str, attention: Attention, transport: Any = None
    ) -> dict[str, Any]:
        vanilla = engine == "vanilla"
        tr = "" if transport is None else f" over {transport.value}"
        label = (
            f"{self.shape.name} layer T={self.seq_len}: "
            f"{'vanilla CrypTen' if vanilla else 'secfwt ' + attention.value}{tr}"
        )
        key = f"layer/{self.shape.name}/{self.seq_len}/{engine}/{attention.value}/{tr}"
        common = {
            "case": "vanilla_forward" if vanilla else "secure_forward",
            "what": "block",
            "attention": attention,
            "input_shape": tuple(self.x.shape),
            "param_names": self.names,
            "reps": self.reps,
        }
        res = runner.run(
            key,
            label,
            model_owner={"spec": self.spec, "state": self.state},
            data_owner={"input": self.x},
            common=common,
            transport=transport,
            vanilla=vanilla,
        )
        s = _case_summary(res)
        s.update(
            kind="layer",
            engine=engine,
            attention=attention.value,
            shape=self.shape.describe(),
            seq_len=self.seq_len,
            batch=1,
        )
        s["max_abs_err"] = _max_err(
            res["values"][Role.DATA_OWNER]["output"], self.reference(attention)
        )
        return s

    def plaintext(self, reps: int) -> dict[str, Any]:
        from secfwt.bench.shapes import hf_layer_fn

        return time_plaintext(hf_layer_fn(self.hf, self.x), reps=reps)


def _forward(plan: BenchPlan, runner: Runner, layers: dict[str, _Layer]) -> dict[str, Any]:
    layer = layers.setdefault("main", _Layer(plan, plan.layer, plan.layer_seq_len))
    plain = layer.plaintext(plan.plaintext_reps)
    cases = [
        layer.run(runner, engine="secfwt", attention=a) for a in (Attention.SOFTMAX, Attention.RFA)
    ]
    cases.append(_minilm(plan, runner))
    soft = cases[0]
    return {
        "plaintext_layer": {
            **plain,
            "what": (
                "transformers BertLayer float32, torch.no_grad, "
                f"fastest of 1 thread and all cores ({plain['threads']})"
            ),
            "shape": layer.shape.describe(),
            "seq_len": layer.seq_len,
        },
        "cases": cases,
        "vs_plaintext_ratio": metrics.ratio(soft["time_s"], plain["best_s"]),
        "vs_plaintext_ratio_rfa": metrics.ratio(cases[1]["time_s"], plain["best_s"]),
        "vs_plaintext_seq_len": layer.seq_len,
    }


def _minilm(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    """The packaged all-MiniLM-L6-v2: embeddings LayerNorm + 6 layers from shared word
    embeddings."""
    from secfwt.models.checkpoint import load_checkpoint, resolve_model_path
    from secfwt.runtime.verify import sample_inputs

    model_dir = resolve_model_path("packaged:all-minilm-l6-v2")
    spec, state = load_checkpoint(model_dir, head=Head.BASE, num_labels=2, seed=plan.seed)
    t = plan.minilm_seq_len
    ids, _ = sample_inputs(model_dir, seq_len=t, vocab_size=spec.vocab_size, seed=plan.seed)
    word = state[spec.word_embeddings][
        ids
    ]  # (1, T, H): the data owner embeds locally (SecFwT's setting)
    names = [
        n for n, _ in spec.param_shapes if n != spec.word_embeddings and not n.startswith("pooler.")
    ]
    common = {
        "case": "secure_forward",
        "what": "encoder",
        "attention": Attention.SOFTMAX,
        "input_shape": tuple(word.shape),
        "param_names": names,
        "reps": plan.reps,
    }
    label = f"MiniLM-L6 (packaged, 6 layers) T={t}: secfwt softmax"
    res = runner.run(
        f"minilm/{t}",
        label,
        model_owner={"spec": spec, "state": state},
        data_owner={"input": word},
        common=common,
    )
    s = _case_summary(res)
    import transformers as tf

    hf = tf.BertModel.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager"
    ).eval()
    mask = torch.ones(ids.shape, dtype=torch.long)
    plain = time_plaintext(
        lambda: hf(inputs_embeds=word, attention_mask=mask), reps=plan.plaintext_reps
    )
    with torch.no_grad():
        ref = hf(inputs_embeds=word, attention_mask=mask).last_hidden_state
    s.update(
        engine="secfwt",
        attention="softmax",
        shape="all-MiniLM-L6-v2 (packaged checkpoint, 6 layers, hidden 384)",
        seq_len=t,
        batch=1,
    )
    s["max_abs_err"] = _max_err(res["values"][Role.DATA_OWNER]["output"], ref)
    s["plaintext"] = plain
    s["vs_plaintext_ratio"] = metrics.ratio(s["time_s"], plain["best_s"])
    return s


def _vanilla(plan: BenchPlan, runner: Runner, layers: dict[str, _Layer]) -> dict[str, Any]:
    layer = layers.setdefault("main", _Layer(plan, plan.layer, plan.layer_seq_len))
    secfwt = layer.run(runner, engine="secfwt", attention=Attention.SOFTMAX)
    vanilla = layer.run(runner, engine="vanilla", attention=Attention.SOFTMAX)
    return {
        "definition": (
            "vanilla = CrypTen 0.4.1's own ops (cryptensor matmul, softmax, "
            "LayerNorm from mean/var/inv_sqrt, "
            "GELU in tanh form with CrypTen's tanh), every weight secret-shared, "
            "and SECFWT_RING_MATMUL=0 in every process, "
            "dealer included: CrypTen's int64 matmul, Beaver protocol, gloo collectives, "
            "torch random draws and validating "
            "__getattribute__; same TTP dealer, gloo, 1 thread per party. "
            "Not undone (no effect on speed): exact fixed-point "
            "decode, onnx stub, transport shim."
        ),
        "cases": [secfwt, vanilla],
        "vs_vanilla_crypten_ratio": metrics.ratio(vanilla["time_s"], secfwt["time_s"]),
        "vs_vanilla_bytes_ratio": metrics.ratio(
            vanilla["bytes_sent_total"], secfwt["bytes_sent_total"]
        ),
        "seq_len": layer.seq_len,
    }


def _attention(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    from secfwt.models.attention import (
        RFASettings,
        rfa_attention,
        rfa_projection,
        softmax_attention,
    )
    from secfwt.models.ops import PlainOps

    heads, dh, b = plan.attention_heads, plan.attention_head_dim, 1
    g = torch.Generator().manual_seed(plan.seed + 2)
    qkv = {
        t: [torch.randn(b, heads, t, dh, generator=g) for _ in range(3)]
        for t in plan.attention_seq_lens
    }
    out: dict[str, Any] = {
        "heads": heads,
        "head_dim": dh,
        "batch": b,
        "seq_lens": list(plan.attention_seq_lens),
        "rows": [],
        "exponents": {},
    }
    settings = RFASettings()
    w = rfa_projection(layer=0, head_dim=dh, settings=settings)
    for att in (Attention.SOFTMAX, Attention.RFA):
        common = {
            "case": "attention",
            "attention": att,
            "heads": heads,
            "head_dim": dh,
            "batch": b,
            "seq_lens": list(plan.attention_seq_lens),
            "reps": plan.reps,
        }
        res = runner.run(
            f"attention/{att.value}",
            f"attention core {att.value}, T={','.join(map(str, plan.attention_seq_lens))}",
            model_owner={},
            data_owner={"qkv": qkv},
            common=common,
        )
        rows_mo = res["values"][Role.MODEL_OWNER]["rows"]
        rows_do = res["values"][Role.DATA_OWNER]["rows"]
        for rm, rd in zip(rows_mo, rows_do, strict=True):
            t = rm["seq_len"]
            s = _pick({Role.MODEL_OWNER: rm["costs"], Role.DATA_OWNER: rd["costs"]})
            q, k, v = (x.double() for x in qkv[t])
            mask = torch.ones(b, t, dtype=torch.float64)
            ref = (
                rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=settings)
                if att is Attention.RFA
                else softmax_attention(PlainOps(), q, k, v, mask)
            )
            out["rows"].append(
                {
                    "attention": att.value,
                    "seq_len": t,
                    **s,
                    "max_abs_err": _max_err(rd["output"], ref),
                }
            )
        mine = [r for r in out["rows"] if r["attention"] == att.value]
        ts = [r["seq_len"] for r in mine]
        out["exponents"][att.value] = {
            "time": metrics.growth_exponent(ts, [r["time_s"] for r in mine]),
            "bytes": metrics.growth_exponent(ts, [r["bytes_sent_total"] for r in mine]),
        }
    return out


#: |secure loss - float64 plaintext loss| above which a tuning-step case is reported as wrong
#: (the losses are about 0.7; secfwt's steps agree to about 3e-3, CrypTen's autograd to about 0.03
#: where its softmax works, T <= 128, and not at all from T ~ 256, where its softmax breaks).
LOSS_TOLERANCE = 0.1


def _plain_step_loss(
    spec: Any,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    cut: int,
    attention: Attention,
) -> float:
    """float64 plaintext loss of the tuning steps' model at the starting parameters (secfwt's
    encoder on PlainOps from the same cached prefix; the SPSA step reports the mean of its two
    perturbed losses, which differs from this by O(eps^2))."""
    from secfwt.models.encoder import ForwardSettings, plain_params
    from secfwt.models.ops import PlainOps
    from secfwt.tuning.forward import CachedForward

    b, t = labels.shape[0], x.shape[1]
    onehot = torch.nn.functional.one_hot(labels, spec.num_labels).double()
    runner = CachedForward(
        ops=PlainOps(),
        public=lambda z: z.double(),
        spec=spec,
        frozen={},
        settings=ForwardSettings(attention=attention),
        cache=x.double(),
        mask=torch.ones(b, t, dtype=torch.float64),
        pool_w=None,
        onehot=onehot,
        cut=cut,
        prompt_layer=0,
    )
    return float(runner.loss(plain_params(state), list(range(b))))


def _fot_vs_backprop(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    """One forward-only step vs one backpropagation step, same model, batch and trainable set.

    Model: a MiniLM-shaped BERT classifier with ``1 + fot_layers`` layers, random weights.
    Trainable (both sides): every parameter of the top ``fot_layers`` layers, the pooler and
    the classifier. Layer 0 is frozen; its output for the batch is the cached frozen prefix
    (shares the data owner provides here), as secfwt caches it when only upper layers train,
    so neither step runs it: both start from the same shared hidden states.
    Forward-only: :func:`secfwt.tuning.spsa.spsa_step` over
    :class:`~secfwt.tuning.forward.CachedForward` (secfwt's engine, secret mask and labels,
    ``fot_directions`` public directions, two forwards each, secret cross-entropy, local
    update), with RFA (SecFwT) and, for reference, softmax.
    Backprop: CrypTen autograd over :mod:`secfwt.bench.vanilla` (CrypTen's softmax, no mask),
    ``cross_entropy``, ``backward()``, ``crypten.optim.SGD.step()`` with no gradient threshold.
    Both run with the same CrypTen patches (ring matmul on), TTP dealer, gloo: the headline
    ratio compares the algorithms on one engine. A second backprop row runs the vanilla CrypTen
    engine (as in ``vanilla``: ring matmul off everywhere, validating attribute access), i.e.
    what CrypTen 0.4.1 itself gives; its ratios are ``fot_vs_vanilla_backprop_*``.
    """
    layers = 1 + plan.fot_layers
    spec, state, _ = synthetic_model(
        plan.fot_shape, layers=layers, head=Head.SEQUENCE_CLASSIFICATION, seed=plan.seed
    )
    b, t = plan.fot_batch, plan.fot_seq_len
    x = hidden_states(batch=b, seq_len=t, hidden=plan.fot_shape.hidden, seed=plan.seed + 3)
    labels = torch.arange(b) % 2
    trainable = [f"{spec.prefix}encoder.layer.{i}.*" for i in range(1, layers)] + [
        f"{spec.prefix}pooler.*",
        "classifier.*",
    ]
    common = {
        "trainable": trainable,
        "batch": b,
        "seq_len": t,
        "directions": plan.fot_directions,
        "seed": plan.seed,
        "reps": plan.step_reps,
    }
    mo = {"spec": spec, "state": state}
    do = {"input": x, "labels": labels}
    desc = (
        f"{plan.fot_shape.name}-shaped, {plan.fot_layers} trainable layer(s) + head, B={b}, T={t}"
    )
    reference = {
        att: _plain_step_loss(spec, state, x, labels, cut=1, attention=att)
        for att in (Attention.SOFTMAX, Attention.RFA)
    }
    cases, wrong = {}, []
    for key, label, extra, vanilla in (
        (
            "fot_rfa",
            f"forward-only SPSA step, secfwt RFA ({desc})",
            {"case": "fot_step", "attention": Attention.RFA},
            False,
        ),
        (
            "fot_softmax",
            f"forward-only SPSA step, secfwt softmax ({desc})",
            {"case": "fot_step", "attention": Attention.SOFTMAX},
            False,
        ),
        (
            "backprop",
            f"backprop step, CrypTen autograd + SGD, secfwt ring matmul ({desc})",
            {"case": "backprop_step"},
            False,
        ),
        (
            "backprop_vanilla",
            f"backprop step, CrypTen autograd + SGD, vanilla CrypTen engine ({desc})",
            {"case": "backprop_step"},
            True,
        ),
    ):
        res = runner.run(
            f"fot/{key}",
            label,
            model_owner=mo,
            data_owner=do,
            common={**common, **extra},
            vanilla=vanilla,
        )
        s = _case_summary(res)
        loss = res["values"][Role.DATA_OWNER]["output"]
        ref = reference[
            extra.get("attention", Attention.SOFTMAX)
        ]  # the backprop step runs CrypTen's softmax
        s.update(
            loss=None if loss is None else float(loss),
            loss_reference=ref,
            max_abs_err=None if loss is None else abs(float(loss) - ref),
            trainable_numel=res["values"][Role.MODEL_OWNER]["trainable_numel"],
        )
        if s["max_abs_err"] is not None and s["max_abs_err"] > LOSS_TOLERANCE:
            log.warning(
                "%s: loss %.4g, plaintext %.4g: this case computed a wrong result",
                label,
                s["loss"],
                ref,
            )
            wrong.append(label)
        cases[key] = s
    fot, bp = cases["fot_rfa"], cases["backprop"]
    return {
        "setup": _fot_vs_backprop.__doc__,
        "shape": plan.fot_shape.describe(),
        "trainable_patterns": trainable,
        "batch": b,
        "seq_len": t,
        "directions": plan.fot_directions,
        "cases": list(cases.values()),
        "loss_references": {att.value: loss for att, loss in reference.items()},
        "loss_tolerance": LOSS_TOLERANCE,
        "wrong_results": wrong,
        "fot_vs_backprop_time_ratio": metrics.ratio(bp["time_s"], fot["time_s"]),
        "fot_vs_backprop_bytes_ratio": metrics.ratio(
            bp["bytes_sent_total"], fot["bytes_sent_total"]
        ),
        "fot_softmax_vs_backprop_time_ratio": metrics.ratio(
            bp["time_s"], cases["fot_softmax"]["time_s"]
        ),
        "fot_softmax_vs_backprop_bytes_ratio": metrics.ratio(
            bp["bytes_sent_total"], cases["fot_softmax"]["bytes_sent_total"]
        ),
        "fot_vs_vanilla_backprop_time_ratio": metrics.ratio(
            cases["backprop_vanilla"]["time_s"], fot["time_s"]
        ),
        "fot_vs_vanilla_backprop_bytes_ratio": metrics.ratio(
            cases["backprop_vanilla"]["bytes_sent_total"], fot["bytes_sent_total"]
        ),
    }


def _transport(plan: BenchPlan, runner: Runner, layers: dict[str, _Layer]) -> dict[str, Any]:
    from secfwt.mpc.transport import Transport

    layer = layers.setdefault(
        "transport", _Layer(plan, plan.transport_shape, plan.transport_seq_len)
    )
    cases = [
        layer.run(runner, engine="secfwt", attention=Attention.SOFTMAX, transport=tr)
        for tr in (Transport.GLOO, Transport.TLS)
    ]
    for c, tr in zip(cases, (Transport.GLOO, Transport.TLS), strict=True):
        c["transport"] = tr.value
    return {
        "cases": cases,
        "tls_vs_gloo_time_ratio": metrics.ratio(cases[1]["time_s"], cases[0]["time_s"]),
    }


# -- the suite ----------------------------------------------------------------------------------

HEADLINE_KEYS = tuple(t.key for t in metrics.TARGETS)


def run_suite(
    names: Sequence[BenchName], plan: BenchPlan, *, on_case: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the chosen sub-benchmarks; return the report (headline ratios at the top level)."""
    from secfwt.runtime.simulate import machine_info

    runner = Runner(plan, on_case=on_case)
    layers: dict[str, _Layer] = {}
    code_before = code_fingerprint()
    load_before = load_average()
    cpu_before = cpu_seconds()
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: dict[str, Any] = {}
    for name in names:
        t_bench = time.perf_counter()
        if name is BenchName.FORWARD:
            r = _forward(plan, runner, layers)
        elif name is BenchName.ATTENTION:
            r = _attention(plan, runner)
        elif name is BenchName.FOT_VS_BACKPROP:
            r = _fot_vs_backprop(plan, runner)
        elif name is BenchName.VANILLA:
            r = _vanilla(plan, runner, layers)
        else:
            r = _transport(plan, runner, layers)
        r["duration_s"] = time.perf_counter() - t_bench
        results[name.value] = r
    headline = _headline(results)
    (busy0, own0), (busy1, own1) = cpu_before, cpu_seconds()
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0))
    machine = {
        **machine_info(),
        **cpu_info(),
        "load_average_at_start": load_before,
        "other_cpu_s": other,
    }
    report: dict[str, Any] = {
        **headline,
        "targets": [
            {
                "key": t.key,
                "text": t.text,
                "threshold": t.threshold,
                "at_least": t.at_least,
                "value": headline[t.key],
                "passed": t.passed(headline[t.key]),
            }
            for t in metrics.TARGETS
        ],
        "benchmarks": results,
        "selected": [n.value for n in names],
        "quick": plan.quick,
        "plan": plan.to_dict(),
        "links": {
            link.name: {"bandwidth_bps": link.bandwidth_bps, "rtt_s": link.rtt_s}
            for link in metrics.LINKS
        },
        "projection": (
            "modelled: max_p wall_p + (max_p sent_p + max_p dealer_p) * 8 / bandwidth "
            "+ (max_p rounds_p + max_p dealer_requests_p) * RTT"
        ),
        "provider": "TTP (dealer process)",
        "machine": machine,
        "commit": machine.get("commit"),
        "code": {
            **code_before,
            "changed_during_run": code_fingerprint()["sha256"] != code_before["sha256"],
        },
        "started": started,
        "duration_s": time.perf_counter() - t0,
    }
    return report


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    fot = results.get(BenchName.FOT_VS_BACKPROP.value, {})
    att = results.get(BenchName.ATTENTION.value, {}).get("exponents", {}).get("rfa", {})
    return {
        "fot_vs_backprop_time_ratio": fot.get("fot_vs_backprop_time_ratio"),
        "fot_vs_backprop_bytes_ratio": fot.get("fot_vs_backprop_bytes_ratio"),
        "vs_vanilla_crypten_ratio": results.get(BenchName.VANILLA.value, {}).get(
            "vs_vanilla_crypten_ratio"
        ),
        "vs_plaintext_ratio": results.get(BenchName.FORWARD.value, {}).get("vs_plaintext_ratio"),
        "rfa_time_growth_exponent": att.get("time"),
        "rfa_bytes_growth_exponent": att.get("bytes"),
    }


def code_fingerprint() -> dict[str, Any]:
    """Where the secfwt code the parties import lives, and a SHA-256 over its .py files.

    Party processes import secfwt when they start, so if the tree changes during a run (someone
    editing the engine), later cases measure different code: the report says so.
    """
    import hashlib
    from pathlib import Path

    import secfwt

    root = Path(secfwt.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = bool(r.stdout.strip()) if r.returncode == 0 else None
    return {"path": str(root), "sha256": h.hexdigest(), "uncommitted_changes": dirty}


def cpu_seconds() -> tuple[float | None, float]:
    """(busy CPU seconds of the whole machine since boot, or None off Linux; CPU seconds of this
    process and its finished children, i.e. the bench and the party processes it has reaped).

    Their difference over a run is the CPU other work took from it. /proc/stat is read by hand
    rather than adding psutil for one counter.
    """
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None, own
    user, nice, system, _idle, _iowait, irq, softirq = fields[
        :7
    ]  # clock ticks; guest time is in user
    busy = user + nice + system + irq + softirq
    return busy / os.sysconf("SC_CLK_TCK"), own


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_info() -> dict[str, Any]:
    import platform

    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo", encoding="utf-8") as fh:
            mem = round(int(fh.readline().split()[1]) / 2**20, 1)
    return {
        "cpu_model": model or platform.processor() or None,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "load_average_at_end": load_average(),
        "torch_threads": torch.get_num_threads(),
    }


__all__ = ["BenchName", "BenchPlan", "HEADLINE_KEYS", "parse_names", "run_suite", "summarise"]
