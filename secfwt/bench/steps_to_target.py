"""Steps to a target held-out accuracy gain, from each algorithm's plaintext twin.

The ``time-to-target`` case measures what one step costs in MPC; how many steps a method needs
comes from its plaintext twin on the same data, evaluated after every step:

* ZO: the job itself replayed in float64 (:func:`secfwt.tuning.reference.plain_zo_run`, as
  ``make run``'s replay does), at several joint seeds (the ZO directions depend on the seed the
  parties draw at each run, so the step count does too);
* backprop: full-batch SGD with exact gradients (torch autograd) through secfwt's float64
  encoder (:class:`~secfwt.models.encoder.EncoderModel` on
  :class:`~secfwt.models.ops.PlainOps`, the model the MPC steps compute), training the top
  ``top`` layers and the classifier from the job's checkpoint and initial head; what MPC
  backprop by CrypTen autograd + ``crypten.optim.SGD`` would compute without fixed-point error.

Both on the job's train/held-out split, with one rule: the first step after which the held-out
accuracy is at least the starting accuracy plus the gain and stays so for the ``confirm`` steps
that follow (or to the end of the run).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Accuracies are counts over the held-out rows: a gain equal to the target up to rounding counts.
_EPS = 1e-9


def steps_to_target(
    curve: Sequence[float], before: float, *, gain: float, confirm: int
) -> int | None:
    """The first step s (1-based; ``curve[s - 1]`` is the accuracy after step s) from which
    ``curve`` stays at least ``before + gain`` for s and the ``confirm`` steps after it (those
    the curve has); None when no step does."""
    ok = [a - before >= gain - _EPS for a in curve]
    for s in range(1, len(curve) + 1):
        if all(ok[s - 1 : s + confirm]):
            return s
    return None


@dataclasses.dataclass(frozen=True)
class Job:
    """The job whose data and model the twins train: config, model (spec, state) and data."""

    cfg: Any
    spec: Any
    state: dict[str, torch.Tensor]
    data: Any

    @classmethod
    def load(cls, path: Path) -> Job:
        from secfwt.config import load_job
        from secfwt.models.checkpoint import load_checkpoint, resolve_model_path
        from secfwt.runtime.data_owner import prepare_inputs

        cfg = load_job(path)
        folder = resolve_model_path(cfg.model.path)
        spec, state = load_checkpoint(folder, head=cfg.model.head, num_labels=2, seed=cfg.job.seed)
        return cls(cfg, spec, state, prepare_inputs(cfg, tokenizer_dir=folder))


def zo_twin(job: Job, *, seeds: Sequence[int], gain: float, confirm: int) -> dict[str, Any]:
    """The job's ZO run replayed in plaintext at each joint seed: held-out accuracy after every
    step and the steps to the target gain."""
    from secfwt.tuning.reference import plain_zo_run

    runs = []
    for seed in seeds:
        r = plain_zo_run(
            job.cfg, spec=job.spec, state=job.state, data=job.data, seed=seed, curve=True
        )
        curve = r["accuracy_curve"]
        runs.append(
            {
                "seed": seed,
                "accuracy_before": r["accuracy_before"],
                "accuracy_after": r["accuracy_after"],
                "steps": steps_to_target(curve, r["accuracy_before"], gain=gain, confirm=confirm),
                "curve": curve,
            }
        )
        log.info("ZO twin, seed %d: %s steps to target", seed, runs[-1]["steps"])
    return {"method": "zo", "max_steps": job.cfg.zo.steps, "runs": runs}


def backprop_twin(
    job: Job, *, top: int | None, lr: float, max_steps: int, gain: float, confirm: int
) -> dict[str, Any]:
    """Full-batch SGD (learning rate ``lr``) on the job's training rows through the float64
    encoder, training the top ``top`` layers and the classifier (None: every weight but the
    word embeddings), stopped once the target is reached and confirmed or after ``max_steps``."""
    from secfwt.models.encoder import EncoderModel, plain_params
    from secfwt.models.ops import PlainOps
    from secfwt.tuning.forward import forward_settings, mean_pool_weights

    cfg, spec, data = job.cfg, job.spec, job.data
    ops, settings = PlainOps(), forward_settings(cfg, seed=cfg.job.seed)
    params = plain_params(job.state)
    cut = 0 if top is None else spec.num_layers - top
    upper = tuple(f"{spec.prefix}encoder.layer.{i}." for i in range(cut, spec.num_layers))
    names = [
        n
        for n in params
        if n != spec.word_embeddings
        and (top is None or n.startswith(upper) or n.startswith("classifier"))
    ]
    for n in names:
        params[n] = params[n].clone().requires_grad_(True)
    mask = data.attention_mask.to(torch.float64)  # (N, T)
    pool_w = mean_pool_weights(data.attention_mask)  # (N, T)
    onehot = torch.nn.functional.one_hot(data.labels, data.num_labels).to(torch.float64)
    n, n_train = data.input_ids.shape[0], data.n_train
    train, held_out = torch.arange(n_train), torch.arange(n_train, n)
    word = params[spec.word_embeddings][data.input_ids]  # (N, T, H), frozen
    with torch.no_grad():  # the frozen layers below the cut, once (as a job caches them)
        frozen = EncoderModel(spec, params, ops, settings)
        below = frozen.layers(frozen.embed(word), mask, stop=cut) if cut else None

    def logits(ix: torch.Tensor) -> torch.Tensor:  # (len(ix), C)
        model = EncoderModel(spec, params, ops, settings)
        h = below[ix] if below is not None else model.embed(word[ix])
        return model.output(model.layers(h, mask[ix], start=cut), pool_w[ix])

    def accuracy() -> float:
        with torch.no_grad():
            return float((logits(held_out).argmax(-1) == data.labels[held_out]).double().mean())

    opt = torch.optim.SGD([params[k] for k in names], lr=lr)
    before, curve = accuracy(), []
    for _ in range(max_steps):
        opt.zero_grad()
        ops.log_softmax_nll(logits(train), onehot[train]).mean().backward()
        opt.step()
        curve.append(accuracy())
        log.debug(
            "backprop twin, top %s: step %d, held-out accuracy %.4f", top, len(curve), curve[-1]
        )
        s = steps_to_target(curve, before, gain=gain, confirm=confirm)
        if s is not None and len(curve) >= s + confirm:
            break
    steps = steps_to_target(curve, before, gain=gain, confirm=confirm)
    log.info("backprop twin, top %s, lr %g: %s steps to target", top, lr, steps)
    return {
        "method": "backprop",
        "top_layers": top,
        "lr": lr,
        "max_steps": max_steps,
        "trainable_numel": sum(params[k].numel() for k in names),
        "accuracy_before": before,
        "steps": steps,
        "curve": curve,
    }


__all__ = ["Job", "backprop_twin", "steps_to_target", "zo_twin"]
