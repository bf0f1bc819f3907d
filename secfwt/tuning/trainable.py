"""Which parameters a job trains, chosen by Hugging Face names, and their initial values.

Trainable sets are public (both parties know the names and shapes); the values are the model
owner's (checkpoint weights, new LoRA factors, a soft prompt initialised from its own
embedding rows) and are secret-shared like every other weight.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re

import torch

from secfwt.config import JobConfig, Mode
from secfwt.errors import ConfigError
from secfwt.models.encoder import LORA_A, LORA_B, SOFT_PROMPT
from secfwt.models.spec import Head, ModelSpec
from secfwt.tuning.swat import update_scales

#: The layer index in a parameter name: BERT/RoBERTa ``encoder.layer.N.``, Llama-family
#: decoders ``model.layers.N.``.
_LAYER_RE = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class TrainableSet:
    """Names and shapes of trainable parameters (existing and new), in a fixed order."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    new: tuple[str, ...]  # names that are not in the checkpoint (LoRA factors, soft prompt)
    prompt_layer: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    def first_layer(self, spec: ModelSpec) -> int:
        """Index of the first layer whose output depends on a trainable value.

        Everything below it is frozen and computed once (the cached prefix); ``num_layers``
        means only the head trains (a decoder's final norm or LM head).
        """
        first = spec.num_layers
        for name in self.names:
            if name == SOFT_PROMPT:
                first = min(first, self.prompt_layer)
            elif _is_embedding(spec, name):
                first = 0
            else:
                m = _LAYER_RE.search(name)
                if m:
                    first = min(first, int(m.group(1)))
        return first

    def attention_frozen(self, spec: ModelSpec) -> bool:
        """Whether the first trained layer of an encoder trains only in its feed-forward half
        (``intermediate.*``, ``output.*``: LoRA on the FFN, its LayerNorm): its attention half
        then depends on no trainable value and belongs to the cached prefix, and a step runs
        only the feed-forward half of that layer (in MPC about half its cost: no softmax, no
        attention LayerNorm). Decoders keep their prefix at a layer boundary."""
        first = self.first_layer(spec)
        if first >= spec.num_layers or any(
            n == SOFT_PROMPT or _is_embedding(spec, n) for n in self.names
        ):
            return False
        layer = f"{spec.prefix}encoder.layer.{first}."
        ffn = (layer + "intermediate.", layer + "output.")
        inside = [n for n in self.names if n.startswith(layer)]
        return bool(inside) and all(n.startswith(ffn) for n in inside)

    def pooler_trainable(self, spec: ModelSpec) -> bool:
        return any(n.startswith(spec.prefix + "pooler.") for n in self.names)


def _is_embedding(spec: ModelSpec, name: str) -> bool:
    return "embeddings." in name or name.startswith(spec.word_embeddings.rsplit(".", 1)[0])


def select_trainable(
    spec: ModelSpec,
    *,
    patterns: tuple[str, ...],
    lora_modules: tuple[str, ...],
    lora_rank: int,
    soft_prompt_length: int,
    prompt_layer: int,
    max_tokens: int,
) -> TrainableSet:
    """Resolve name patterns (fnmatch, e.g. ``classifier.*``, ``*.bias``) against the checkpoint."""
    names = [n for n, _ in spec.param_shapes]
    shapes: dict[str, tuple[int, ...]] = {}
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            examples = ", ".join(names[-4:])
            raise ConfigError(
                f"zo.trainable: pattern {pat!r} matches no parameter of this model; names look "
                f"like: {examples}"
            )
        for n in hits:
            shapes[n] = spec.shape_of(n)
    new: list[str] = []
    for pat in lora_modules:
        modules = sorted(
            {
                n[: -len(".weight")]
                for n in names
                if n.endswith(".weight") and fnmatch.fnmatchcase(n[: -len(".weight")], pat)
            }
        )
        table = spec.word_embeddings.removesuffix(".weight")
        modules = [
            m
            for m in modules
            if len(spec.shape_of(m + ".weight")) == 2 and "embeddings" not in m and m != table
        ]
        if not modules:
            raise ConfigError(
                f"zo.lora_modules: pattern {pat!r} matches no linear module; e.g. "
                "'*.attention.self.query'"
            )
        for m in modules:
            out_f, in_f = spec.shape_of(m + ".weight")
            shapes[f"{m}.{LORA_A}"] = (lora_rank, in_f)
            shapes[f"{m}.{LORA_B}"] = (out_f, lora_rank)
            new += [f"{m}.{LORA_A}", f"{m}.{LORA_B}"]
    if soft_prompt_length:
        if prompt_layer > spec.num_layers - 1:
            raise ConfigError(
                f"zo.prompt_layer = {prompt_layer}: the model has layers 0..{spec.num_layers - 1}"
            )
        if soft_prompt_length >= max_tokens:
            raise ConfigError(
                f"zo.soft_prompt_length = {soft_prompt_length} leaves no room for text within "
                f"{max_tokens} tokens"
            )
        shapes[SOFT_PROMPT] = (soft_prompt_length, spec.hidden_size)
        new.append(SOFT_PROMPT)
    ordered = tuple((n, shapes[n]) for n in sorted(shapes))
    return TrainableSet(shapes=ordered, new=tuple(sorted(new)), prompt_layer=prompt_layer)


def initial_values(
    spec: ModelSpec, state: dict[str, torch.Tensor], trainable: TrainableSet, *, seed: int
) -> dict[str, torch.Tensor]:
    """Starting values of every trainable parameter: checkpoint weights plus new ones."""
    return {
        **{n: state[n] for n in trainable.names if n in state},
        **init_new_parameters(spec, state, trainable, seed=seed),
    }


def init_new_parameters(
    spec: ModelSpec, state: dict[str, torch.Tensor], trainable: TrainableSet, *, seed: int
) -> dict[str, torch.Tensor]:
    """Initial values of new trainable parameters (model owner only).

    LoRA (Hu et al. 2022): A ~ N(0, 1/r), B = 0, so training starts at the checkpoint's function.
    Soft prompt: embedding rows of random vocabulary tokens (Lester et al. 2021, "sampled vocab").
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in trainable.shapes:
        if name not in trainable.new:
            continue
        if name == SOFT_PROMPT:
            table = state[spec.word_embeddings]
            rows = torch.randint(
                1000 if spec.vocab_size > 2000 else 0, spec.vocab_size, (shape[0],), generator=g
            )
            out[name] = table[rows].clone()
        elif name.endswith(LORA_A):
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[0])
        else:
            out[name] = torch.zeros(shape)
    return out


def trainable_set(cfg: JobConfig, spec: ModelSpec) -> TrainableSet:
    """The job's trainable set: ``[zo]`` selection for ZO jobs; none for CMA (the prompt is the
    data owner's, inserted at ``cma.prompt_layer``). Refuses ``[safety]`` patterns that match
    none of it."""
    if cfg.job.mode is Mode.CMA:
        return TrainableSet(shapes=(), new=(), prompt_layer=cfg.cma.prompt_layer)
    z = cfg.zo
    chosen = select_trainable(
        spec,
        patterns=z.trainable,
        lora_modules=z.lora_modules,
        lora_rank=z.lora_rank,
        soft_prompt_length=z.soft_prompt_length,
        prompt_layer=z.prompt_layer,
        max_tokens=spec.max_tokens,
    )
    if spec.head is Head.CAUSAL_LM:
        _check_causal_trainable(chosen, spec)
    if cfg.safety_gate.safe_delta:
        _check_safe_delta_trainable(chosen)
    update_scales(cfg.safety, chosen.names)  # [safety] patterns match trainable tensors
    return chosen


def _check_causal_trainable(trainable: TrainableSet, spec: ModelSpec) -> None:
    """A causal-LM job looks up the LM head's rows of its target tokens once (the target logits
    are ``<x, E[y]>``), so the head's table, and the word embeddings it may be tied to, stay
    frozen."""
    tables = {spec.word_embeddings.removesuffix(".weight"), "lm_head"}
    for name in trainable.names:
        module = name.rsplit(".", 1)[0]
        if module in tables:
            field = "zo.lora_modules" if name in trainable.new else "zo.trainable"
            raise ConfigError(
                f"{field}: {name} cannot train in a causal_lm job: the loss reads the LM head's "
                "rows of the target tokens once, so the head and the word embeddings stay "
                "frozen; train LoRA factors of the layers or the norm weights instead"
            )


def _check_safe_delta_trainable(trainable: TrainableSet) -> None:
    """Safe Delta corrects each LoRA module's delta ``scale B A``; a tuned tensor of the model
    itself passes through unchanged, which is right for a norm weight or a bias (1-D) but would
    release an uncorrected Linear weight."""
    for name, shape in trainable.shapes:
        if name not in trainable.new and len(shape) > 1:
            raise ConfigError(
                f"zo.trainable: {name} {shape} is a weight matrix without LoRA, and "
                "safety_gate.safe_delta corrects only LoRA deltas; adapt its module through "
                "zo.lora_modules instead, or set safety_gate.safe_delta = false"
            )
