"""Per-party checkpoints of an MPC tuning job, and resuming from them.

End to end (real party processes, the tiny ZO job, TTP dealer, fixed test seeds):

* an uninterrupted run, started with ``resume=True`` on empty folders (so it also shows that
  a resume with no checkpoint starts from step 0 and completes);
* the same job with the data owner SIGKILLed once it reported its checkpoint of step 2
  (a real kill at whatever point it had reached by then, not a polite stop);
* a resume of that job: the parties agree on the latest step both hold and continue.

"Same result" is **bit-identical** here, not "within tolerance": the parties restore their
own raw shares (theta and the cached prefix), share everything else exactly as the first
run did, and under ``insecure_fixed_seed`` every PRG of the session, the dealer's included,
is reseeded from (test seed, step) at each checkpoint (:func:`secfwt.mpc.seeding.insecure_reseed`),
so the steps after the checkpoint draw the same randomness in both runs. In production
(OS-seeded PRGs) a resumed run draws fresh randomness: CrypTen's local truncation then
differs by +-1 unit of 2^-16 per truncated value and step, the same size as between any two
runs of the job; it is not asserted here because it is not a property of resuming.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from secfwt.config import load_job
from secfwt.errors import ConfigError, ProtocolError
from secfwt.roles import Role
from secfwt.runtime.checkpoint import (
    KEEP,
    PREFIX_AFTER_ATTENTION,
    PREFIX_AT_LAYER,
    CheckpointRef,
    PartyCheckpoints,
    common_checkpoint,
)
from tests.conftest import DataOwnerKiller, write_tiny_job

SEED = 424242
STEPS = 5
KILL_AT = 2


def _cfg(tmp_path: Path, model_dir: Path, name: str, *extra: str):
    (tmp_path / name).mkdir()
    job = write_tiny_job(tmp_path / name, model_dir)
    return load_job(
        job, overrides=[f"zo.steps={STEPS}", f'run.output_dir="{tmp_path / name / "runs"}"', *extra]
    )


def _final(report: dict) -> dict[str, torch.Tensor]:
    return torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])


# ------------------------------------------------------------------------------------------------
# End to end: interrupted by SIGKILL, resumed, bit-identical to the uninterrupted run
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_then_resumed_zo_job_equals_the_uninterrupted_run(tmp_path, tiny_tok_dir) -> None:
    from secfwt.runtime.simulate import run_simulation

    # 1. uninterrupted (resume=True on empty folders: no checkpoint -> starts from step 0)
    phases: list[str] = []
    ref = run_simulation(
        _cfg(tmp_path, tiny_tok_dir, "ref"),
        insecure_fixed_seed=SEED,
        checkpoint_dir=tmp_path / "ref-ckpt",
        checkpoint_every=1,
        resume=True,
        on_progress=lambda role, msg: (
            phases.append(msg.get("phase", "")) if role is Role.DATA_OWNER else None
        ),
    )
    assert ref["steps"] == STEPS and ref["resumed_from_step"] is None
    assert "no common checkpoint: starting from step 0" in phases
    for role in ("model_owner", "data_owner"):  # the last KEEP step files survive
        held = sorted(p.name for p in (tmp_path / "ref-ckpt" / role).glob("step-*.pt"))
        assert held == [f"step-{s:08d}.pt" for s in range(STEPS - KEEP + 1, STEPS + 1)], held

    # 2. the same job, the data owner SIGKILLed after it reported its checkpoint of step KILL_AT
    cfg = _cfg(tmp_path, tiny_tok_dir, "run")
    ckpt_dir = tmp_path / "run-ckpt"
    kill_data_owner = DataOwnerKiller(at_step=KILL_AT)

    with pytest.raises(ProtocolError):
        run_simulation(
            cfg,
            insecure_fixed_seed=SEED,
            checkpoint_dir=ckpt_dir,
            checkpoint_every=1,
            on_progress=kill_data_owner,
        )
    assert kill_data_owner.killed, (
        "the data owner was never killed "
        "(did the job finish before its checkpoint message arrived?)"
    )

    # 3. resume: the parties agree on the latest step both hold and continue from it
    resumed_msgs: list[dict] = []
    res = run_simulation(
        cfg, insecure_fixed_seed=SEED, checkpoint_dir=ckpt_dir, checkpoint_every=1, resume=True,
        on_progress=lambda role, msg: resumed_msgs.append(msg) if role is Role.DATA_OWNER else None,
    )  # fmt: skip
    start = res["resumed_from_step"]
    assert start is not None and KILL_AT - 1 <= start < STEPS, (
        start
    )  # KILL_AT - 1: killed mid-write
    assert any(m.get("phase") == f"resumed from step {start}" for m in resumed_msgs)
    assert [m["step"] for m in resumed_msgs if m.get("kind") == "checkpoint"] == list(
        range(start + 1, STEPS + 1)
    )
    assert not any(
        m.get("kind") == "prefix" for m in resumed_msgs
    )  # the prefix came from the checkpoint

    # bit-identical: losses, accuracies, final parameters
    assert res["steps"] == ref["steps"] == STEPS
    assert res["loss_history"] == ref["loss_history"]
    assert (
        res["accuracy_before"] == ref["accuracy_before"]
        and res["accuracy_after"] == ref["accuracy_after"]
    )
    a, b = _final(ref), _final(res)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------------
# Refusals (real processes, they fail before any MPC work)
# ------------------------------------------------------------------------------------------------
def _fake_step(folder: Path, role: Role, *, job_digest: str, step: int = 1) -> None:
    PartyCheckpoints(folder, role=role, job_digest=job_digest, terms_digest="t").write(
        step=step,
        checkpoint_id="abc",
        joint_seed=1,
        history=[],
        accuracy_before=None,
        theta_shares={},
        precision_bits=16,
        prefix_id="",
    )


@pytest.mark.multiprocess
def test_a_checkpoint_of_another_job_is_refused(tmp_path, tiny_tok_dir) -> None:
    from secfwt.runtime.simulate import run_simulation

    cfg = _cfg(tmp_path, tiny_tok_dir, "job")
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        _fake_step(tmp_path / "ckpt" / role.value, role, job_digest="0" * 64)
    with pytest.raises(ConfigError, match="belongs to another job"):
        run_simulation(cfg, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, resume=True)


@pytest.mark.multiprocess
def test_a_fresh_start_into_a_folder_with_checkpoints_is_refused(tmp_path, tiny_tok_dir) -> None:
    from secfwt.runtime.contract import public_job_digest
    from secfwt.runtime.simulate import run_simulation

    cfg = _cfg(tmp_path, tiny_tok_dir, "job")
    # one party's folder holds a checkpoint of this very job (same job and terms digests)
    PartyCheckpoints(
        tmp_path / "ckpt" / "data_owner",
        role=Role.DATA_OWNER,
        job_digest=public_job_digest(cfg),
        terms_digest=cfg.terms.digest(),
    ).write(
        step=1,
        checkpoint_id="abc",
        joint_seed=1,
        history=[],
        accuracy_before=None,
        theta_shares={},
        precision_bits=16,
        prefix_id="",
    )
    with pytest.raises(ConfigError, match="already holds checkpoints of this job"):
        run_simulation(cfg, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, resume=False)


@pytest.mark.multiprocess
def test_a_prefix_cached_to_another_end_is_refused(tmp_path, tiny_tok_dir) -> None:
    """A checkpoint whose prefix ends at a layer boundary (unmarked: an earlier version's)
    for a trainable set whose prefix now ends after the attention half: refused before any
    weight is shared, naming the way out."""
    from secfwt.runtime.contract import public_job_digest
    from secfwt.runtime.simulate import run_simulation

    cfg = _cfg(
        tmp_path,
        tiny_tok_dir,
        "job",
        'zo.trainable=["classifier.*"]',
        'zo.lora_modules=["*.layer.1.intermediate.dense", "*.layer.1.output.dense"]',
    )
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        store = PartyCheckpoints(
            tmp_path / "ckpt" / role.value,
            role=role,
            job_digest=public_job_digest(cfg),
            terms_digest=cfg.terms.digest(),
        )
        store.write_prefix("p1", torch.zeros(3, dtype=torch.int64), end=PREFIX_AT_LAYER)
        _write(store, 1, prefix_id="p1")
    with pytest.raises(ConfigError, match="empty both parties' checkpoint folders"):
        run_simulation(cfg, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, resume=True)


# ------------------------------------------------------------------------------------------------
# The checkpoint folder itself (no processes)
# ------------------------------------------------------------------------------------------------
def _store(tmp_path: Path, role: Role = Role.DATA_OWNER, job: str = "j" * 64) -> PartyCheckpoints:
    return PartyCheckpoints(tmp_path / role.value, role=role, job_digest=job, terms_digest="terms")


def _write(store: PartyCheckpoints, step: int, *, prefix_id: str = "", local=None) -> None:
    store.write(
        step=step, checkpoint_id=f"id{step}", joint_seed=7,
        history=[{"step": s, "loss": 0.5} for s in range(1, step + 1)], accuracy_before=0.4,
        theta_shares={"w": torch.full((2, 3), step, dtype=torch.int64)}, precision_bits=16,
        prefix_id=prefix_id, local=local,
    )  # fmt: skip


def test_writes_keep_the_last_two_steps_and_the_prefix_they_name(tmp_path) -> None:
    s = _store(tmp_path)
    s.write_prefix("p1", torch.arange(6, dtype=torch.int64), end=PREFIX_AFTER_ATTENTION)
    for step in (2, 4, 6):
        _write(s, step, prefix_id="p1")
    names = sorted(p.name for p in s.folder.iterdir())
    assert names == ["prefix-p1.pt", "step-00000004.pt", "step-00000006.pt"], (
        names
    )  # no temporary files
    refs = s.available()
    assert [(r.step, r.checkpoint_id) for r in refs] == [(4, "id4"), (6, "id6")]
    ckpt, cache = s.load(refs[-1])
    assert (
        ckpt.step == 6
        and ckpt.joint_seed == 7
        and len(ckpt.history) == 6
        and ckpt.accuracy_before == 0.4
    )
    assert torch.equal(ckpt.theta_shares["w"], torch.full((2, 3), 6, dtype=torch.int64))
    assert torch.equal(cache, torch.arange(6, dtype=torch.int64))
    assert ckpt.prefix_end == PREFIX_AFTER_ATTENTION


def test_a_prefix_file_without_its_end_marked_ends_at_a_layer(tmp_path) -> None:
    """Prefix files written before the mark existed all ended at a layer boundary; the job
    refuses to resume one where its trainable set now caches past the attention half."""
    s = _store(tmp_path)
    s.write_prefix("p1", torch.arange(6, dtype=torch.int64), end=PREFIX_AFTER_ATTENTION)
    path = s.folder / "prefix-p1.pt"
    old = torch.load(path, weights_only=True)
    del old["prefix_end"]
    torch.save(old, path)
    _write(s, 1, prefix_id="p1")
    ckpt, _ = s.load(s.available()[-1])
    assert ckpt.prefix_end == PREFIX_AT_LAYER


def test_the_common_step_is_the_latest_pair_both_parties_wrote_together(tmp_path) -> None:
    mine = [CheckpointRef(step=s, checkpoint_id=f"id{s}", path=tmp_path) for s in (3, 4)]
    # the peer was killed while writing step 4: it holds 2 and 3
    assert common_checkpoint(mine, [(2, "id2"), (3, "id3")]).step == 3
    # same step, another write (another run of the job): never paired
    assert common_checkpoint(mine, [(3, "other"), (4, "other")]) is None
    assert common_checkpoint([], []) is None


def test_files_of_another_job_terms_or_role_are_refused(tmp_path) -> None:
    _write(_store(tmp_path, job="a" * 64), 1)
    with pytest.raises(ConfigError, match="belongs to another job"):
        _store(tmp_path, job="b" * 64).available()
    other_terms = PartyCheckpoints(
        tmp_path / "data_owner", role=Role.DATA_OWNER, job_digest="a" * 64, terms_digest="other"
    )
    with pytest.raises(ConfigError, match="other disclosure terms"):
        other_terms.available()
    wrong_role = PartyCheckpoints(
        tmp_path / "data_owner", role=Role.MODEL_OWNER, job_digest="a" * 64, terms_digest="terms"
    )
    with pytest.raises(ConfigError, match="give each party its own checkpoint_dir"):
        wrong_role.available()
    (tmp_path / "data_owner" / "step-00000009.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read it"):
        _store(tmp_path, job="a" * 64).available()


def test_a_tampered_local_state_is_not_unpickled(tmp_path) -> None:
    s = _store(tmp_path)
    _write(s, 1, local={"es": [1, 2, 3]})
    ckpt, _ = s.load(s.available()[-1])
    assert ckpt.local == {"es": [1, 2, 3]}
    (s.folder / "local-00000001.pkl").write_bytes(pickle.dumps({"es": "swapped"}))
    with pytest.raises(ConfigError, match="SHA-256 does not match"):
        s.load(s.available()[-1])


def test_a_restored_cma_search_continues_exactly(tmp_path) -> None:
    """The data owner's CMA-ES state (cma object + numpy's generator) survives a pickle round
    trip."""
    from secfwt.tuning.cma import CMASettings, PromptSearch

    settings = CMASettings(
        intrinsic_dim=6, prompt_length=2, hidden_size=4, population=5, sigma0=0.5, seed=11
    )

    def losses(c: torch.Tensor) -> list[float]:
        return [float((p - 0.3).pow(2).sum()) for p in c]

    straight = PromptSearch(settings, embedding_std=0.1)
    for _ in range(6):
        straight.tell(losses(straight.ask()))

    first = PromptSearch(settings, embedding_std=0.1)
    for _ in range(3):
        first.tell(losses(first.ask()))
    saved = pickle.dumps(first.state())
    import numpy as np

    np.random.seed(999)  # a new process: numpy's generator is elsewhere
    second = PromptSearch(settings, embedding_std=0.1)
    second.restore(pickle.loads(saved))
    for _ in range(3):
        second.tell(losses(second.ask()))
    assert torch.equal(second.mean_prompt, straight.mean_prompt)


def test_the_job_digest_is_unchanged_without_a_safety_section_and_covers_one() -> None:
    """Checkpoints name their job by this digest: one written before ``[safety]`` and
    ``[safety_gate]`` existed (the settings hashed without them) must still resume, and either
    section must change it."""
    import dataclasses
    import hashlib
    import json

    from secfwt.config import SafetyGateSection, SafetySection
    from secfwt.runtime.contract import public_job_digest

    cfg = load_job("secfwt/jobs/default.toml")
    new_sections = ("source", "safety", "safety_gate")
    before = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in new_sections}
    as_before = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode())
    assert public_job_digest(cfg) == as_before.hexdigest()
    swat = dataclasses.replace(cfg, safety=SafetySection(lr_multipliers=(("*.weight", 0.5),)))
    assert public_job_digest(swat) != public_job_digest(cfg)
    gate = SafetyGateSection(prompts="packaged:advbench-gate", max_drop=0.5)
    assert public_job_digest(dataclasses.replace(cfg, safety_gate=gate)) != public_job_digest(cfg)
