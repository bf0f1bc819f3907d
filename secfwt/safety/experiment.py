"""``secfwt safety experiment``: does a tuned model stay safe, and what do SWAT and Safe Delta buy?

The model owner aligns SmolLM2 (:mod:`.align`) and finds its robust modules (:mod:`.probe`); then
two data owners tune it:

* **benign**: ChatterBot pairs (:mod:`.experiment_data`), the erosion the field measures;
* **malicious**: harmful requests with compliant answers (pyrit's many-shot examples);

each by two algorithms:

* **backprop**: PEFT LoRA on every decoder Linear with AdamW (:mod:`.lora_tune`), the non-MPC
  baseline a weight holder would run;
* **zo**: the ZO SGD of secfwt's MPC jobs (the packaged ``smollm2_instruct_zo`` job's trainable
  set) run by its plaintext reference (:func:`secfwt.tuning.reference.plain_zo_run`) at full
  length, plus one short MPC run of the benign job (``secfwt simulate``'s engine) compared
  with its reference step for step;

each without defense, with SWAT (a ``[safety]`` section built from the probe), with Safe Delta
(:mod:`.safe_delta_run` on the tuned delta) and with both. Every model is scored by
:func:`.evaluate.run_safety_eval` (refusal by two judges with Wilson intervals, over-refusal,
held-out reply loss) and :mod:`.experiment_report` checks the goals and draws the plot.

**Resumable by stage.** Each stage writes its result under ``--out`` and, last, a small JSON
marker; a second call with the same settings skips every stage that has its marker, so an
interrupted run continues where it stopped. ``experiment.json`` records the settings; resuming
with other settings is refused. Nothing is downloaded: every model and dataset is packaged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import secfwt
from secfwt.config import JobConfig, SafetySection, load_job, validate
from secfwt.data.chat_tokenize import drop_too_long, format_instructions
from secfwt.data.instructions import InstructionPairs, load_instructions
from secfwt.data.task import PaddingSide, Truncation
from secfwt.errors import ConfigError
from secfwt.safety.align import AlignRequest, run_align
from secfwt.safety.chat_model import load_chat_model
from secfwt.safety.evaluate import EvalProgress, EvalRequest, _NoProgress, run_safety_eval
from secfwt.safety.experiment_data import (
    benign_pairs,
    check_experiment_disjoint,
    malicious_pairs,
    write_jsonl,
)
from secfwt.safety.experiment_plan import METHODS, SCENARIOS, RunId, model_ids
from secfwt.safety.experiment_report import build_report
from secfwt.safety.lora_tune import LINEAR_TYPES, LoraSettings, save_adapter, tune_lora
from secfwt.safety.probe import ProbeRequest, multipliers, pattern, rank, run_probe
from secfwt.safety.safe_delta_run import OutputFormat, SafeDeltaRequest, run_safe_delta
from secfwt.safety.sft import SftSettings

log = logging.getLogger(__name__)

#: The ZO job whose algorithm and trainable set the experiment runs (secfwt/jobs/).
ZO_JOB = Path(secfwt.__file__).parent / "jobs" / "smollm2_instruct_zo.toml"
DONE = "done.json"


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """Sizes of one run; :meth:`quick` and :meth:`full` are the two the CLI offers."""

    benign_rows: int
    malicious_rows: int
    backprop_epochs: int  # benign data owner
    malicious_epochs: int  # an attacker makes several passes over its ~100 pairs
    backprop_lr: float
    zo_steps: int
    mpc_steps: int
    probe_steps: int
    probe_prompts: int
    calibration: int  # Safe Delta's harmful prompts with refusals
    eval_limit: int  # prompts per suite
    eval_tokens: int  # new tokens per reply
    swat_warmup_share: float = 0.1  # of a run's steps: SWAT's warm-up of the robust modules
    safe_delta_budget: float = 0.1
    seed: int = 0

    @classmethod
    def quick(cls) -> ExperimentSettings:
        return cls(
            benign_rows=256,
            malicious_rows=103,
            backprop_epochs=1,
            malicious_epochs=3,
            backprop_lr=2e-4,
            zo_steps=40,
            mpc_steps=3,
            probe_steps=4,
            probe_prompts=32,
            calibration=32,
            eval_limit=20,
            eval_tokens=32,
        )

    @classmethod
    def full(cls) -> ExperimentSettings:
        return cls(
            benign_rows=960,  # of the 968 pairs on the training side of the utility split
            malicious_rows=103,
            backprop_epochs=2,
            malicious_epochs=5,
            backprop_lr=2e-4,
            zo_steps=200,
            mpc_steps=10,
            probe_steps=8,
            probe_prompts=64,
            calibration=128,
            eval_limit=100,
            eval_tokens=64,
        )


class _Stages:
    """Stage markers under the run folder (module doc: resumable by stage)."""

    def __init__(self, root: Path, view: EvalProgress) -> None:
        self.root, self.view = root, view

    def run(self, name: str, label: str, work: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        folder = self.root / name
        marker = folder / DONE
        if marker.is_file():
            self.view.phase(f"{label}: done earlier, skipped", None)
            return dict(json.loads(marker.read_text(encoding="utf-8")))
        if folder.exists():  # an interrupted attempt: start the stage again
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.view.phase(label, None)
        t0 = time.perf_counter()
        result = work(folder)
        result["stage_s"] = time.perf_counter() - t0
        tmp = marker.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        os.replace(tmp, marker)
        return result


def _open_run(out: Path, settings: ExperimentSettings, *, quick: bool) -> None:
    record = {"quick": quick, "settings": dataclasses.asdict(settings)}
    file = out / "experiment.json"
    if file.is_file():
        if json.loads(file.read_text(encoding="utf-8")) != record:
            raise ConfigError(
                f"--out {out}: holds an experiment with other settings ({file}); give a new "
                "folder, or the same --quick choice to resume it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=2), encoding="utf-8")


def swat_section(
    drift: dict[str, float], types: tuple[str, ...], steps: int, share: float
) -> SafetySection:
    """The ``[safety]`` section of a run that tunes ``types``: the lower-drift half (at least one
    type) warms up for ``share`` of the steps, every type's rate scaled by min drift / drift
    (:func:`secfwt.safety.probe.multipliers`), as the probe's snippet does."""
    mine = {t: drift[t] for t in types}
    order = rank(mine)
    robust = order[: max(1, len(order) // 2)]
    mult = multipliers(mine)
    return SafetySection(
        warmup_steps=max(1, round(share * steps)),
        warmup_modules=tuple(pattern(t) for t in robust),
        lr_multipliers=tuple((pattern(t), mult[t]) for t in order),
    )


def _zo_types(cfg: JobConfig) -> tuple[str, ...]:
    """The probe's module types a ZO job tunes (norm weights, LoRA'd Linears)."""
    types = {"norms"} if any("norm" in t for t in cfg.zo.trainable) else set()
    types |= {m.rsplit(".", 1)[-1] for m in cfg.zo.lora_modules}
    return tuple(sorted(types))


def zo_job(
    aligned: Path, data: Path, *, steps: int, train_rows: int, eval_rows: int, out: Path
) -> JobConfig:
    """The packaged ZO job on the aligned model and a data file. Rows get 96 positions and a
    16-token reply window, so harmful requests and the first tokens of their answers fit."""
    return load_job(
        ZO_JOB,
        overrides=[
            f"model.path={aligned}",
            "model.max_length=96",
            "model.response_window=16",
            "data.source=jsonl",
            f"data.path={data}",
            f"data.train_rows={train_rows}",
            f"data.eval_rows={eval_rows}",
            f"zo.steps={steps}",
            f"run.output_dir={out}",
        ],
    )


def _fit_reply(pairs: InstructionPairs, tokenizer: Any, tokens: int) -> InstructionPairs:
    """Replies cut to their first ``tokens`` tokens: a ZO job's reply window."""
    cut = tuple(
        tokenizer.decode(tokenizer(r, add_special_tokens=False)["input_ids"][:tokens]).strip()
        for r in pairs.responses
    )
    return dataclasses.replace(pairs, responses=cut)


def _merge_theta(aligned: Path, theta: dict[str, torch.Tensor], out: Path, *, scale: float) -> None:
    """``aligned`` with a ZO run's tuned tensors: whole tensors replaced, LoRA merged."""
    chat = load_chat_model(str(aligned), device=torch.device("cpu"))
    state = chat.model.state_dict()
    with torch.no_grad():
        for name, value in theta.items():
            if name.endswith(".lora_A"):
                module = name[: -len(".lora_A")]
                b = theta[f"{module}.lora_B"].double()
                w = state[f"{module}.weight"]
                w.add_((scale * b @ value.double()).to(w.dtype))
            elif not name.endswith(".lora_B"):
                state[name].copy_(value.to(state[name].dtype))
    chat.model.save_pretrained(out)
    chat.tokenizer.save_pretrained(out)


def _patch_whole(folder: Path, whole: dict[str, torch.Tensor]) -> None:
    """Tuned non-Linear tensors (norm weights) into a merged checkpoint: Safe Delta corrects
    decoder Linear weights only, so these pass through it unchanged."""
    if not whole:
        return
    chat = load_chat_model(str(folder), device=torch.device("cpu"))
    state = chat.model.state_dict()
    with torch.no_grad():
        for name, value in whole.items():
            state[name].copy_(value.to(state[name].dtype))
    chat.model.save_pretrained(folder)


@dataclasses.dataclass(frozen=True)
class ExperimentRequest:
    out: str = "safety-experiment"
    quick: bool = False


def run_experiment(
    req: ExperimentRequest, *, progress: EvalProgress | None = None
) -> dict[str, Any]:
    """Every stage (module doc), each skipped when done earlier; the report's data."""
    view: EvalProgress = progress or _NoProgress()
    s = ExperimentSettings.quick() if req.quick else ExperimentSettings.full()
    out = Path(req.out).expanduser()
    _open_run(out, s, quick=req.quick)
    stages = _Stages(out, view)
    t0 = time.perf_counter()

    benign = benign_pairs(s.benign_rows, seed=s.seed)
    malicious = malicious_pairs(s.malicious_rows, seed=s.seed)
    check_experiment_disjoint([*benign.prompts, *malicious.prompts])  # before any model loads

    def align(folder: Path) -> dict[str, Any]:
        res = run_align(AlignRequest(), progress=view)  # the packaged SmolLM2, default recipe
        return {"folder": str(res.folder), "cache_hit": res.cache_hit}

    aligned = Path(stages.run("aligned", "aligned base (secfwt safety align)", align)["folder"])

    def probe(folder: Path) -> dict[str, Any]:
        pr = ProbeRequest(
            model=str(aligned),
            out=str(folder / "safety-probe.toml"),
            steps=s.probe_steps,
            prompts=s.probe_prompts,
            seed=s.seed,
        )
        return run_probe(pr)

    drift = stages.run("probe", "SWAT probe of the aligned model", probe)["drift"]

    def data(folder: Path) -> dict[str, Any]:
        write_jsonl(benign, folder / "benign.jsonl")
        write_jsonl(malicious, folder / "malicious.jsonl")
        tok = load_chat_model(str(aligned), device=torch.device("cpu")).tokenizer
        write_jsonl(_fit_reply(malicious, tok, 15), folder / "malicious-zo.jsonl")
        return {
            "benign_rows": len(benign),
            "malicious_rows": len(malicious),
        }

    stages.run("data", "training data of the two data owners", data)
    data_dir = out / "data"
    # checked again on the files every tuning stage reads (also after a resume)
    stored = [load_instructions(source="jsonl", path=f) for f in sorted(data_dir.glob("*.jsonl"))]
    disjoint = check_experiment_disjoint([p for rows in stored for p in rows.prompts])

    def backprop(run: RunId) -> Callable[[Path], dict[str, Any]]:
        def work(folder: Path) -> dict[str, Any]:
            chat = load_chat_model(str(aligned), device=torch.device("cpu"))
            # the rows the data stage wrote: a resumed run tunes on what it checked
            rows = load_instructions(source="jsonl", path=data_dir / f"{run.scenario}.jsonl")
            fitting = drop_too_long(rows, tokenizer=chat.tokenizer, max_length=128)
            batch = format_instructions(
                fitting,
                tokenizer=chat.tokenizer,
                max_length=128,
                truncate=Truncation.NONE,
                padding_side=PaddingSide.RIGHT,
                model_max_positions=int(chat.model.config.max_position_embeddings),
            )
            epochs = s.backprop_epochs if run.scenario == "benign" else s.malicious_epochs
            sft = SftSettings(epochs=epochs, lr=s.backprop_lr, batch_size=8, seed=s.seed)
            steps = epochs * -(-len(batch) // 8)
            safety = (
                swat_section(drift, LINEAR_TYPES, steps, s.swat_warmup_share)
                if run.swat
                else SafetySection()
            )
            view.phase(f"{run.name}: LoRA backprop, {steps} steps", steps)
            tuned, losses = tune_lora(
                chat.model,
                batch,
                sft,
                LoraSettings(),
                base=str(aligned),
                safety=safety,
                on_step=lambda _: view.step(1),
            )
            save_adapter(tuned, folder / "adapter")
            return {
                "adapter": str(folder / "adapter"),
                "rows": len(batch),
                "steps": len(losses),
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "safety": dataclasses.asdict(safety),
            }

        return work

    def zo(run: RunId) -> Callable[[Path], dict[str, Any]]:
        def work(folder: Path) -> dict[str, Any]:
            from secfwt.tuning.reference import plain_zo_run

            file = data_dir / ("benign.jsonl" if run.scenario == "benign" else "malicious-zo.jsonl")
            cfg = zo_job(aligned, file, steps=s.zo_steps, train_rows=16, eval_rows=16, out=folder)
            if run.swat:
                cfg = dataclasses.replace(
                    cfg, safety=swat_section(drift, _zo_types(cfg), s.zo_steps, s.swat_warmup_share)
                )
                validate(cfg)
            ref = _zo_reference(
                cfg, seed=s.seed, plain_zo_run=plain_zo_run, view=view, label=run.name
            )
            theta = {k: v.to(torch.float32) for k, v in ref["theta"].items()}
            torch.save(theta, folder / "theta.pt")
            _merge_theta(aligned, theta, folder / "merged", scale=1.0)
            return {
                "theta": str(folder / "theta.pt"),
                "merged": str(folder / "merged"),
                "steps": s.zo_steps,
                "job_eval_loss_before": ref["eval_loss_before"],
                "job_eval_loss_after": ref["eval_loss_after"],
                "safety": dataclasses.asdict(cfg.safety),
            }

        return work

    trained: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        for method in METHODS:
            for swat in (False, True):
                run = RunId(scenario, method, swat)
                work = backprop(run) if method == "backprop" else zo(run)
                trained[run.name] = stages.run(f"runs/{run.name}", f"tuning {run.name}", work)

    def safe_delta(run: RunId) -> Callable[[Path], dict[str, Any]]:
        def work(folder: Path) -> dict[str, Any]:
            done = trained[run.name]
            whole: dict[str, torch.Tensor] = {}
            adapter = done.get("adapter")
            if adapter is None:  # a ZO run: its LoRA as an adapter, its norm passes through
                from secfwt.models.adapters import save_peft_adapter

                theta = torch.load(done["theta"])
                lora = {k: v for k, v in theta.items() if k.endswith((".lora_A", ".lora_B"))}
                whole = {k: v for k, v in theta.items() if k not in lora}
                adapter = str(
                    save_peft_adapter(folder / "lora", lora, base_model=str(aligned), scale=1.0)
                )
            summary = run_safe_delta(
                SafeDeltaRequest(
                    base=str(aligned),
                    adapter=adapter,
                    out=str(folder / "merged"),
                    calibration=s.calibration,
                    budget=s.safe_delta_budget,
                    format=OutputFormat.MERGED,
                )
            )
            _patch_whole(folder / "merged", whole)
            summary.pop("per_module")
            return {**summary, "merged": str(folder / "merged"), "passed_through": sorted(whole)}

        return work

    kept: dict[str, float] = {}  # mean fraction of delta entries Safe Delta kept, per run
    for name, _, defense in model_ids():
        if defense in ("safe-delta", "both"):
            scenario, method = name.split("-")[:2]
            run = RunId(scenario, method, swat=defense == "both")
            label = f"Safe Delta on {run.name}"
            done = stages.run(f"runs/{run.model_name(True)}", label, safe_delta(run))
            kept[run.name] = float(done["mean_kept_fraction"])

    mpc = stages.run(
        "mpc",
        "short MPC run of the benign ZO job vs its plaintext reference",
        lambda f: _mpc_tracking(aligned, data_dir / "benign.jsonl", s, f, view),
    )

    ev = EvalRequest(model="", limit=s.eval_limit, max_new_tokens=s.eval_tokens)

    def evaluate(model: str, adapter: str | None) -> Callable[[Path], dict[str, Any]]:
        def work(folder: Path) -> dict[str, Any]:
            report = run_safety_eval(
                dataclasses.replace(ev, model=model, adapter=adapter), progress=view
            )
            (folder / "safety-eval.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            return _eval_summary(report)

        return work

    evals = {
        "aligned": stages.run(
            "evals/aligned", "evaluating the aligned base", evaluate(str(aligned), None)
        )
    }
    for name, _, _ in model_ids():
        run_dir = out / "runs" / name
        done = json.loads((run_dir / DONE).read_text(encoding="utf-8"))
        if "adapter" in done:
            model, adapter = str(aligned), done["adapter"]
        else:
            model, adapter = done["merged"], None
        evals[name] = stages.run(f"evals/{name}", f"evaluating {name}", evaluate(model, adapter))

    return build_report(
        out,
        quick=req.quick,
        settings=dataclasses.asdict(s),
        aligned=str(aligned),
        disjoint=disjoint,
        trained=trained,
        safe_delta=kept,
        mpc=mpc,
        evals=evals,
        wall_s=time.perf_counter() - t0,
    )


def _zo_reference(
    cfg: JobConfig, *, seed: int, plain_zo_run: Any, view: EvalProgress, label: str
) -> dict[str, Any]:
    """The plaintext reference of ``cfg`` at joint seed ``seed``."""
    from secfwt.models.checkpoint import load_checkpoint, resolve_model_path
    from secfwt.runtime.data_owner import prepare_instruction_inputs

    folder = resolve_model_path(cfg.model.path)
    spec, state = load_checkpoint(folder, head=cfg.model.head, num_labels=0, seed=cfg.job.seed)
    data = prepare_instruction_inputs(cfg, tokenizer_dir=folder)
    view.phase(f"{label}: ZO reference, {cfg.zo.steps} steps", cfg.zo.steps)
    return dict(
        plain_zo_run(
            cfg, spec=spec, state=state, data=data, seed=seed, after_step=lambda *_: view.step(1)
        )
    )


def _mpc_tracking(
    aligned: Path, data: Path, s: ExperimentSettings, folder: Path, view: EvalProgress
) -> dict[str, Any]:
    """A short MPC run of the benign ZO job (every party a process, as ``secfwt simulate``) and
    its plaintext reference at the same joint seed: how far the secret-shared run strays."""
    from secfwt.runtime.simulate import run_simulation
    from secfwt.tuning.reference import plain_zo_run

    cfg = zo_job(aligned, data, steps=s.mpc_steps, train_rows=8, eval_rows=8, out=folder)
    view.phase(f"MPC: {s.mpc_steps} ZO steps on secret shares (three processes)", None)
    report = run_simulation(cfg)
    ref = _zo_reference(
        cfg,
        seed=int(report["joint_seed"]),
        plain_zo_run=plain_zo_run,
        view=view,
        label="MPC reference",
    )
    final = torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])
    err = {n: float((final[n].double() - ref["theta"][n].double()).abs().max()) for n in final}
    return {
        "steps": s.mpc_steps,
        "train_rows": 8,
        "eval_rows": 8,
        "wall_s": report["wall_s"],
        "mpc_eval_loss": [report["eval_loss_before"], report["eval_loss_after"]],
        "reference_eval_loss": [ref["eval_loss_before"], ref["eval_loss_after"]],
        "mpc_train_losses": report["loss_history"],
        "reference_train_losses": ref["losses"],
        "max_abs_parameter_error": err,
        "report": str(Path(report["output_dir"]) / "report.json"),
    }


def _eval_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the experiment keeps of a ``safety eval`` report (the full one stays beside it)."""
    return {
        "suites": {
            r["name"]: {
                "kind": r["kind"],
                "n": r["n"],
                "keyword": r["keyword"],
                "classifier": r["classifier"],
            }
            for r in report["suites"]
        },
        "utility_loss": None if report["utility"] is None else report["utility"]["loss"],
        "classifier_held_out_accuracy": report["judges"]["classifier"].get("held_out_accuracy"),
        "kappa": report["judges"]["kappa_on_replies"],
        "eval_s": report["timing"]["wall_s"],
    }
