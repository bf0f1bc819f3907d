from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from secfwt.errors import DisclosureError
from secfwt.mpc.disclosure import Discloser, DisclosureTerms, Revealable
from secfwt.roles import Role

ROOT = Path(__file__).resolve().parents[2]


def terms() -> DisclosureTerms:
    return DisclosureTerms.of(
        [
            (Revealable.EVAL_ACCURACY, [Role.DATA_OWNER, Role.MODEL_OWNER]),
            (Revealable.TRAIN_OUTPUTS, [Role.DATA_OWNER]),
        ]
    )


def test_digest_is_canonical():
    a = terms()
    b = DisclosureTerms.of(
        [
            (Revealable.TRAIN_OUTPUTS, [Role.DATA_OWNER]),
            (Revealable.EVAL_ACCURACY, [Role.MODEL_OWNER]),
            (Revealable.EVAL_ACCURACY, [Role.DATA_OWNER]),
        ]
    )
    assert a.digest() == b.digest()
    c = DisclosureTerms.of([(Revealable.TRAIN_OUTPUTS, [Role.MODEL_OWNER, Role.DATA_OWNER])])
    assert c.digest() != a.digest()


class _FakeShared:
    """Stands in for an MPC tensor; reaching get_plain_text would be a test failure."""

    shape = (2,)

    def get_plain_text(self, dst=None):  # pragma: no cover - must not be reached
        raise AssertionError("reveal must be refused before any plaintext is produced")


def test_reveal_outside_terms_raises_and_reveals_nothing(tmp_path):
    d = Discloser(role=Role.DATA_OWNER, terms=terms(), audit_path=tmp_path / "audit.jsonl")
    with pytest.raises(
        DisclosureError, match="train_outputs to model_owner is not in the accepted"
    ):
        d.reveal(_FakeShared(), value=Revealable.TRAIN_OUTPUTS, to=[Role.MODEL_OWNER])
    with pytest.raises(DisclosureError, match="final_parameters"):
        d.reveal(_FakeShared(), value=Revealable.FINAL_PARAMETERS, to=[Role.DATA_OWNER])
    with pytest.raises(DisclosureError, match="dealer"):
        d.reveal(_FakeShared(), value=Revealable.EVAL_ACCURACY, to=[Role.DEALER])
    assert not (tmp_path / "audit.jsonl").exists()


def test_allowed_reveal_is_audited_before_it_happens(tmp_path):
    class Shared(_FakeShared):
        def get_plain_text(self, dst=None):
            lines = (tmp_path / "audit.jsonl").read_text().splitlines()
            assert json.loads(lines[-1])["value"] == "eval_accuracy"  # logged first
            return "plain"

    d = Discloser(role=Role.MODEL_OWNER, terms=terms(), audit_path=tmp_path / "audit.jsonl")
    assert (
        d.reveal(
            Shared(),
            value=Revealable.EVAL_ACCURACY,
            to=[Role.DATA_OWNER, Role.MODEL_OWNER],
            note="x",
        )
        == "plain"
    )
    entry = json.loads((tmp_path / "audit.jsonl").read_text())
    assert (
        entry["to"] == ["data_owner", "model_owner"]
        and entry["party"] == "model_owner"
        and entry["terms"] == terms().digest()
    )


def test_no_module_but_the_discloser_reveals():
    """The design's rule: nothing else calls CrypTen's plaintext reveal."""
    pattern = re.compile(r"\.(get_plain_text|reveal)\(")
    offenders = []
    for path in (ROOT / "secfwt").rglob("*.py"):
        if path.name == "disclosure.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "discloser.reveal(" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []
