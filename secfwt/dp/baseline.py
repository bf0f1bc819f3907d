"""``secfwt dp-baseline``: Opacus DP-SGD in plaintext on a secfwt job's model, data and
trainable set.

The non-MPC reference for a DP job: one party holding both model and data. Same rows
(:func:`secfwt.runtime.data_owner.prepare_inputs`), same starting parameters (the job's
checkpoint state and :func:`secfwt.tuning.trainable.initial_values` under ``job.seed``), same
forward (:class:`secfwt.dp.classifier.DPClassifier`), same privacy plan
(:func:`secfwt.tuning.accounting.plan`, checked before any work).

Mechanism (Abadi et al. 2016, as Opacus implements it): each step includes every training row
with probability ``plan.sample_rate`` (Opacus's ``UniformWithReplacementSampler``, the sampler
inside ``DPDataLoader``); per-example gradients (``GradSampleModule``) are clipped to
``max_grad_norm`` in L2 over all trainable tensors together, summed, noised with
N(0, (noise_multiplier * max_grad_norm)^2) and divided by the expected batch
``sample_rate * n_train`` (``DPOptimizer``); the accountant records every step.

Why not ``PrivacyEngine.make_private``: it derives the sample rate as ``1 / len(data_loader)``,
which is ``1 / ceil(N / batch)`` and not the plan's ``sample_rate`` in general, so the spent
epsilon would differ from the planned one. The same Opacus pieces are put together here with
the plan's exact rate.

Randomness: the Poisson sampler and the noise use generators seeded from the OS
(``secrets``) at the start of a run, never from ``job.seed``, so nobody can predict the noise
from the job file. Their states go into each checkpoint, so a resumed run continues exactly as
the interrupted one would have (the checkpoint is as sensitive as the data). Tests pass
``noise_seed`` to compare two fresh runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from secfwt.config import AccountantName, JobConfig, Mode
from secfwt.dp.classifier import (
    DPClassifier,
    HeadView,
    load_classifier,
    mark_trainable,
    pooled_features,
)
from secfwt.dp.training_state import (
    TrainingState,
    load_state,
    refuse_existing,
    save_state,
    settings_digest,
)
from secfwt.errors import ConfigError
from secfwt.tuning.accounting import DPPlan, make_accountant, plan

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]

#: With the PRV accountant, epsilon-so-far is shown about this many times per run (one PRV
#: evaluation costs about 0.4 s, more than a head-only step of a small model).
_PRV_PROGRESS_POINTS = 5


@dataclasses.dataclass(frozen=True)
class _Data:
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N,)
    n_train: int

    @property
    def n_eval(self) -> int:
        return int(self.input_ids.shape[0]) - self.n_train


class _Rows:
    """What the trained module reads for given rows: token ids and mask, or the frozen pooled
    features when only the head trains."""

    def __init__(self, model: DPClassifier, data: _Data, *, batch: int) -> None:
        self.model, self.data = model, data
        self.features = (
            pooled_features(model, data.input_ids, data.attention_mask, batch=batch)
            if model.head_only()
            else None
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.model if self.features is None else HeadView(self.model)

    def inputs(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        ix = torch.as_tensor(idx, dtype=torch.long)
        if self.features is not None:
            return (self.features[ix],)  # (B, H)
        return self.data.input_ids[ix], self.data.attention_mask[ix]  # (B, T) each

    def accuracy(self, *, batch: int) -> float:
        """Held-out accuracy (evaluation rows are not training rows: no DP needed)."""
        d, module = self.data, self.module
        correct = 0
        with torch.no_grad():
            for s in range(d.n_train, d.n_train + d.n_eval, batch):
                idx = list(range(s, min(d.n_train + d.n_eval, s + batch)))
                correct += int((module(*self.inputs(idx)).argmax(-1) == d.labels[idx]).sum())
        return correct / max(1, d.n_eval)


def check_supported(cfg: JobConfig) -> None:
    """Job settings the baseline cannot mirror; refused before any work."""
    if cfg.job.mode is not Mode.ZO:
        raise ConfigError(
            f"{cfg.source}: job.mode = {cfg.job.mode.value!r}: "
            "dp-baseline trains the zo.trainable parameters with DP-SGD; "
            "use a job with mode = 'zo' (or --set job.mode=zo)"
        )
    if cfg.zo.lora_modules:
        raise ConfigError(
            f"{cfg.source}: zo.lora_modules = {list(cfg.zo.lora_modules)}: "
            "dp-baseline trains zo.trainable patterns only; "
            "remove zo.lora_modules (--set zo.lora_modules=[])"
        )
    if cfg.zo.soft_prompt_length:
        raise ConfigError(
            f"{cfg.source}: zo.soft_prompt_length = {cfg.zo.soft_prompt_length}: "
            "dp-baseline trains zo.trainable patterns only; set zo.soft_prompt_length = 0"
        )


def baseline_plan(cfg: JobConfig, *, n_train: int) -> DPPlan:
    """The privacy plan of the baseline: ``dp.baseline_steps`` steps (default ``zo.steps``)."""
    steps, key = (
        (cfg.dp.baseline_steps, "dp.baseline_steps")
        if cfg.dp.baseline_steps is not None
        else (cfg.zo.steps, "zo.steps")
    )
    return plan(
        cfg.dp,
        n_train=n_train,
        batch_size=cfg.zo.batch_size,
        steps=steps,
        where=cfg.source,
        steps_key=key,
    )


def run_dp_baseline(
    cfg: JobConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    stop_at_step: int | None = None,
    on_progress: Progress | None = None,
    noise_seed: int | None = None,
) -> dict[str, Any]:
    """Train with DP-SGD and return the report.

    ``noise_seed``: fix the sampling and noise generators (reproducibility tests only; the
    default draws them from the OS so the noise is unpredictable).

    ``checkpoint_dir``: write a checkpoint every ``dp.checkpoint_every`` steps, when stopping
    and at the end. ``resume``: continue from the checkpoint there. ``stop_at_step``: stop
    (after checkpointing) once this many steps are done, e.g. to split a long run; the report
    then has ``completed = false``.
    """
    t0 = time.perf_counter()
    progress = on_progress or (lambda msg: None)
    check_supported(cfg)
    _check_checkpoint_args(
        cfg, checkpoint_dir=checkpoint_dir, resume=resume, stop_at_step=stop_at_step
    )
    from secfwt.models.checkpoint import resolve_model_path
    from secfwt.runtime.data_owner import prepare_inputs

    model_dir = resolve_model_path(cfg.model.path)
    progress({"kind": "phase", "phase": "preparing data"})
    inputs = prepare_inputs(cfg, tokenizer_dir=model_dir)
    data = _Data(inputs.input_ids, inputs.attention_mask, inputs.labels, inputs.n_train)
    p = baseline_plan(cfg, n_train=data.n_train)
    if stop_at_step is not None and stop_at_step > p.steps:
        raise ConfigError(f"--stop-at-step {stop_at_step}: the run has only {p.steps} steps")
    digest = _digest(cfg, p, data)
    state = (
        load_state(checkpoint_dir, digest=digest) if resume and checkpoint_dir is not None else None
    )
    if checkpoint_dir is not None and state is None:
        refuse_existing(checkpoint_dir)

    progress({"kind": "phase", "phase": "loading model"})
    model, trained, unused = _job_model(
        cfg, model_dir, num_labels=inputs.num_labels, max_length=int(data.input_ids.shape[1])
    )
    if model.head_only():
        progress(
            {
                "kind": "phase",
                "phase": "frozen encoder features (computed once: only the head trains)",
            }
        )
    rows = _Rows(model, data, batch=cfg.run.eval_batch)
    accuracy_before = (
        state.accuracy_before if state is not None else rows.accuracy(batch=cfg.run.eval_batch)
    )
    progress({"kind": "eval", "when": "before", "accuracy": accuracy_before})
    trainer = _Trainer(
        cfg, model, rows, p, seed=secrets.randbits(62) if noise_seed is None else noise_seed
    )
    if state is not None:
        trainer.restore(state)
        log.info("dp-baseline: resumed at step %d of %d", state.step, p.steps)
    resumed_from = trainer.step
    last = p.steps if stop_at_step is None else stop_at_step
    trainer.run(
        until=last,
        progress=progress,
        checkpoint=None if checkpoint_dir is None else (checkpoint_dir, cfg.dp.checkpoint_every),
        digest=digest,
        accuracy_before=accuracy_before,
    )
    completed = trainer.step == p.steps
    accuracy_after = rows.accuracy(batch=cfg.run.eval_batch) if completed else None
    if completed:
        progress({"kind": "eval", "when": "after", "accuracy": accuracy_after})
    eps = trainer.epsilon()
    return _report(
        cfg,
        p,
        data,
        trainer,
        trained=trained,
        unused=unused,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        epsilon=eps,
        completed=completed,
        resumed_from=resumed_from if state is not None else None,
        wall_s=time.perf_counter() - t0,
        checkpoint_dir=checkpoint_dir,
        noise_seed=noise_seed,
    )


def _job_model(
    cfg: JobConfig, model_dir: Path, *, num_labels: int, max_length: int
) -> tuple[DPClassifier, list[str], list[str]]:
    """The job's starting model: the model owner's checkpoint state and initial trainable
    values under ``job.seed``, exactly as the MPC job shares them; the job's trainable set."""
    from secfwt.models.checkpoint import load_checkpoint
    from secfwt.tuning.trainable import initial_values, trainable_set

    spec, weights = load_checkpoint(
        model_dir, head=cfg.model.head, num_labels=num_labels, seed=cfg.job.seed
    )
    if max_length > spec.max_tokens:
        raise ConfigError(
            f"model.max_length = {max_length} exceeds this model's {spec.max_tokens} positions; "
            "lower model.max_length"
        )
    trainable = trainable_set(cfg, spec)
    values = {**weights, **initial_values(spec, weights, trainable, seed=cfg.job.seed)}
    model = load_classifier(model_dir, spec=spec, values=values, pooling=cfg.model.pooling)
    trained, unused = mark_trainable(model, trainable.names)
    if unused:
        log.warning(
            "dp-baseline: %s do not affect the logits (pooling %s) "
            "and stay at their initial values",
            ", ".join(unused),
            cfg.model.pooling.value,
        )
    return model, trained, unused


def _check_checkpoint_args(
    cfg: JobConfig, *, checkpoint_dir: Path | None, resume: bool, stop_at_step: int | None
) -> None:
    if resume and checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir (the folder of the run to continue)")
    if cfg.dp.checkpoint_every and checkpoint_dir is None:
        raise ConfigError(
            f"{cfg.source}: dp.checkpoint_every = {cfg.dp.checkpoint_every} "
            "needs --checkpoint-dir; pass one or set dp.checkpoint_every = 0"
        )
    if stop_at_step is not None:
        if stop_at_step < 1:
            raise ConfigError(f"--stop-at-step {stop_at_step}: must be >= 1")
        if checkpoint_dir is None:
            raise ConfigError(
                "--stop-at-step needs --checkpoint-dir, or the steps done so far are lost"
            )


def _digest(cfg: JobConfig, p: DPPlan, data: _Data) -> str:
    """Everything that determines the trajectory; not run.* or how often checkpoints are written."""
    public = {
        k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("source", "run", "disclosure")
    }
    public["dp"] = {k: v for k, v in public["dp"].items() if k != "checkpoint_every"}
    return settings_digest(
        {"job": public, "plan": p.to_dict()}, data.input_ids, data.attention_mask, data.labels
    )


class _EpsilonMeter:
    """Epsilon after k steps of the plan, for progress lines only (the report asks the accountant).

    Every step is the same (noise multiplier, sample rate) mechanism, so Renyi DP composes
    additively: Opacus's ``compute_rdp`` for one step, times k, through its ``get_privacy_spent``
    (the functions and orders ``RDPAccountant`` uses) gives every k for the cost of one call.
    PRV has no such shortcut; it is evaluated at a few points only.
    """

    def __init__(self, p: DPPlan) -> None:
        self.plan = p
        self._rdp1 = None
        if p.accountant is AccountantName.RDP:
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis import rdp as analysis

            self._orders = RDPAccountant.DEFAULT_ALPHAS
            self._rdp1 = analysis.compute_rdp(
                q=p.sample_rate, noise_multiplier=p.noise_multiplier, steps=1, orders=self._orders
            )
            self._spent = analysis.get_privacy_spent

    def at(self, step: int) -> float | None:
        p = self.plan
        if self._rdp1 is not None:
            return float(self._spent(orders=self._orders, rdp=self._rdp1 * step, delta=p.delta)[0])
        every = max(1, p.steps // _PRV_PROGRESS_POINTS)
        if step % every and step != p.steps:
            return None
        from secfwt.tuning.accounting import epsilon

        return epsilon(
            noise_multiplier=p.noise_multiplier,
            sample_rate=p.sample_rate,
            steps=step,
            delta=p.delta,
            accountant=p.accountant,
        )


def _seed(seed: int, purpose: str) -> int:
    """Independent 63-bit seeds per purpose, derived from the run's seed."""
    return (
        int.from_bytes(
            hashlib.sha256(f"secfwt-dp-baseline:{seed}:{purpose}".encode()).digest()[:8], "little"
        )
        >> 1
    )


class _Trainer:
    """The Opacus objects of one run and the step loop."""

    def __init__(
        self, cfg: JobConfig, model: DPClassifier, rows: _Rows, p: DPPlan, *, seed: int
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.model, self.rows, self.data, self.plan = model, rows, rows.data, p
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        model.train()  # Opacus records activations in training mode only (dropout is 0 anyway)
        self.gsm = GradSampleModule(rows.module, batch_first=True, loss_reduction="mean")
        self.sampler_rng = torch.Generator().manual_seed(_seed(seed, "poisson-sampling"))
        self.noise_rng = torch.Generator().manual_seed(_seed(seed, "gaussian-noise"))
        self.optimizer = DPOptimizer(
            torch.optim.SGD(self.params, lr=cfg.dp.baseline_lr),
            noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            expected_batch_size=p.expected_batch,  # type: ignore[arg-type]  # float: the exact E[batch]
            loss_reduction="mean",
            generator=self.noise_rng,
        )
        self.accountant = make_accountant(p.accountant)
        self.optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=p.sample_rate)
        )
        self.step = 0
        self.loss_history: list[float | None] = []
        self.batch_sizes: list[int] = []
        self.train_s = 0.0

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.plan.delta)) if self.step else 0.0

    def restore(self, state: TrainingState) -> None:
        with torch.no_grad():
            for n, q in self.named:
                q.copy_(state.trainable[n])
        self.optimizer.load_state_dict(state.optimizer)
        self.accountant.load_state_dict(state.accountant)
        self.sampler_rng.set_state(state.sampler_rng)
        self.noise_rng.set_state(state.noise_rng)
        self.step = state.step
        self.loss_history = list(state.loss_history)
        self.batch_sizes = list(state.batch_sizes)
        self.train_s = state.train_s

    def state(self, *, digest: str, accuracy_before: float) -> TrainingState:
        return TrainingState(
            digest=digest,
            step=self.step,
            trainable={n: q.detach().clone() for n, q in self.named},
            optimizer=self.optimizer.state_dict(),
            accountant=dict(self.accountant.state_dict()),
            sampler_rng=self.sampler_rng.get_state(),
            noise_rng=self.noise_rng.get_state(),
            loss_history=list(self.loss_history),
            batch_sizes=list(self.batch_sizes),
            accuracy_before=accuracy_before,
            train_s=self.train_s,
        )

    def one_step(self, idx: list[int]) -> float | None:
        """One DP-SGD step on the Poisson sample ``idx`` (possibly empty: the step still adds
        noise and counts in the accountant, as the mechanism requires)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = None
        if idx:
            logits = self.gsm(*self.rows.inputs(idx))  # (B, C)
            batch_loss = torch.nn.functional.cross_entropy(logits, self.data.labels[idx])
            with warnings.catch_warnings():
                # Opacus's full backward hooks fire with respect to module outputs because the
                # inputs (token ids, frozen features) need no gradient; torch warns, harmlessly.
                warnings.filterwarnings(
                    "ignore", message="Full backward hook is firing", category=UserWarning
                )
                batch_loss.backward()
            loss = float(batch_loss.detach())
        else:
            for q in self.params:
                q.grad_sample = torch.zeros((0, *q.shape), dtype=q.dtype)  # type: ignore[attr-defined]  # Opacus's attribute
        self.optimizer.step()
        return loss

    def run(
        self,
        *,
        until: int,
        progress: Progress,
        checkpoint: tuple[Path, int] | None,
        digest: str,
        accuracy_before: float,
    ) -> None:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        total = self.plan.steps
        if self.step >= until:
            return
        # The sampler draws one torch.rand(N) from sampler_rng per batch, lazily: after k
        # batches the generator state is exactly what a checkpoint at step k stores.
        sampler = UniformWithReplacementSampler(
            num_samples=self.data.n_train,
            sample_rate=self.plan.sample_rate,
            generator=self.sampler_rng,
            steps=until - self.step,
        )
        meter = _EpsilonMeter(self.plan)
        t_run = time.perf_counter()
        t_base = self.train_s
        for idx in sampler:
            loss = self.one_step(idx)
            self.step += 1
            self.loss_history.append(loss)
            self.batch_sizes.append(len(idx))
            self.train_s = t_base + time.perf_counter() - t_run
            progress(
                {
                    "kind": "step",
                    "step": self.step,
                    "total": total,
                    "loss": loss,
                    "epsilon": meter.at(self.step),
                    "elapsed": self.train_s,
                }
            )
            if checkpoint is not None:
                directory, k = checkpoint
                if (k and self.step % k == 0) or self.step == until:
                    save_state(
                        directory, self.state(digest=digest, accuracy_before=accuracy_before)
                    )


def _report(
    cfg: JobConfig,
    p: DPPlan,
    data: _Data,
    trainer: _Trainer,
    *,
    trained: list[str],
    unused: list[str],
    accuracy_before: float,
    accuracy_after: float | None,
    epsilon: float,
    completed: bool,
    resumed_from: int | None,
    wall_s: float,
    checkpoint_dir: Path | None,
    noise_seed: int | None,
) -> dict[str, Any]:
    from secfwt.runtime.simulate import machine_info

    shapes = dict(trainer.model.named_parameters())
    return {
        "kind": "dp_baseline",
        "job": cfg.job.name,
        "job_file": cfg.source,
        "model": cfg.model.path,
        "pooling": cfg.model.pooling.value,
        "completed": completed,
        "epsilon": epsilon,
        "planned_epsilon": p.epsilon,
        "target_epsilon": p.target_epsilon,
        "delta": p.delta,
        "noise_multiplier": p.noise_multiplier,
        "sample_rate": p.sample_rate,
        "expected_batch": p.expected_batch,
        "max_grad_norm": p.max_grad_norm,
        "accountant": p.accountant.value,
        "steps": trainer.step,
        "planned_steps": p.steps,
        "resumed_from_step": resumed_from,
        "n_train": data.n_train,
        "n_eval": data.n_eval,
        "head_only_cache": trainer.rows.features is not None,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "accuracy_gain_points": None
        if accuracy_after is None
        else 100.0 * (accuracy_after - accuracy_before),
        "optimizer": {"name": "sgd", "lr": cfg.dp.baseline_lr},
        "trainable": {"names": trained, "numel": sum(shapes[n].numel() for n in trained)},
        "unused_trainable": unused,
        "loss_history": trainer.loss_history,
        "batch_sizes": trainer.batch_sizes,
        "noise": "fixed noise_seed (test)"
        if noise_seed is not None
        else "generators seeded from the OS at the start of the run",
        "wall_s": wall_s,
        "train_s": trainer.train_s,
        "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
        "machine": machine_info(),
    }
