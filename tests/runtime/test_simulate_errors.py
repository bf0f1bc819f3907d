"""Bad input to `secfwt simulate`: a clear error naming the problem, and no party left running."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_with_tokenizer, write_tiny_job

pytestmark = pytest.mark.multiprocess


def _descendants(pid: int) -> set[int]:
    kids: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(") ")[-1].split()
        except OSError:
            continue
        if int(fields[1]) in {pid, *kids}:
            kids.add(int(stat.parent.name))
    return kids


def run_cli(args: list[str], timeout: float = 300) -> tuple[int, str, set[int]]:
    """Run the real CLI; also collect the processes it started while it ran."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "secfwt.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _descendants(proc.pid)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out + err, seen


def _alive(pids: set[int], grace_s: float = 10.0) -> set[str]:
    """Processes among ``pids`` still running after a grace period (with their command lines)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = {
            p
            for p in pids
            if Path(f"/proc/{p}").exists()
            and "Z" not in Path(f"/proc/{p}/stat").read_text().split(") ")[-1][:1]
        }
        if not alive or time.monotonic() > deadline:
            return {
                f"{p}: {Path(f'/proc/{p}/cmdline').read_text().replace(chr(0), ' ')}"
                for p in alive
                if Path(f"/proc/{p}").exists()
            }
        time.sleep(0.2)


def test_unknown_job_field_fails_before_any_party_starts(tmp_path, tiny_tok_dir):
    job = write_tiny_job(tmp_path, tiny_tok_dir, extra="\n[zo]\nwarmup = 3\n")
    code, text, seen = run_cli(["simulate", str(job)])
    # TOML itself rejects the repeated [zo] table; either way the field is named
    assert code == 2 and "zo" in text
    assert not seen


def test_missing_model_files(tmp_path):
    job = write_tiny_job(tmp_path, tmp_path / "no-such-model")
    code, text, _ = run_cli(["simulate", str(job)])
    assert code == 3 and "no-such-model is not a directory" in text


def test_label_mismatch_stops_every_party(tmp_path, tiny_tok_dir):
    data = tmp_path / "d.csv"
    data.write_text(
        "text,label\n"
        + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(12))
        + "odd one,maybe\n"
    )
    job = write_tiny_job(tmp_path, tiny_tok_dir, extra="")
    text = job.read_text().replace(
        "[data]\n", f'[data]\nsource = "csv"\npath = "{data}"\nlabels = ["neg", "pos"]\n'
    )
    job.write_text(text)
    code, out, seen = run_cli(["simulate", str(job)])
    assert code == 4, out
    assert "maybe" in out and "label" in out
    assert seen and not _alive(seen)


@pytest.mark.slow  # 16 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
def test_text_longer_than_the_model_allows(tmp_path, tiny_tok_dir):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    code, out, seen = run_cli(["simulate", str(job), "--set", "model.max_length=200"])
    assert code == 2 and "max_length" in out and "80" in out, out  # the tiny model has 80 positions
    assert not _alive(seen)
    code, out, seen = run_cli(
        ["simulate", str(job), "--set", "data.truncate=none", "--set", "model.max_length=8"]
    )
    assert code == 4 and "truncate" in out, out
    assert not _alive(seen)


def test_weights_outside_the_fixed_point_range(tmp_path):
    path = save_tiny_with_tokenizer(tmp_path / "huge")
    from safetensors.torch import load_file, save_file

    f = next(path.glob("*.safetensors"))
    state = load_file(f)
    key = (
        next(k for k in state if k.endswith("classifier.weight"))
        if any(k.endswith("classifier.weight") for k in state)
        else next(iter(state))
    )
    state[key] = torch.full_like(state[key], 1e6)
    save_file(state, f, metadata={"format": "pt"})
    job = write_tiny_job(tmp_path, path)
    code, out, seen = run_cli(["simulate", str(job)])
    assert code == 5 and "fixed-point" in out and "1e+06" in out, out
    assert seen and not _alive(seen)


def test_insecure_provider_needs_the_flag(tmp_path, tiny_tok_dir):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    code, out, _ = run_cli(["simulate", str(job), "--set", "job.provider=tfp"])
    assert code == 2 and "--insecure-dev" in out
