"""One transformer layer run in MPC: the case the layer comparisons share.

``forward``, ``vanilla`` and ``transport`` all time the same synthetic layer (random weights,
one batch of hidden states), built once per suite run and keyed so that a case two of them need
runs once.
"""

from __future__ import annotations

from typing import Any

import torch

from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner, case_summary, max_err, outputs
from secfwt.bench.shapes import (
    LayerShape,
    hidden_states,
    layer_names,
    synthetic_model,
    time_plaintext,
)
from secfwt.models.spec import Attention, Head
from secfwt.roles import Role


class Layer:
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
        s = case_summary(res)
        s.update(
            kind="layer",
            engine=engine,
            attention=attention.value,
            shape=self.shape.describe(),
            seq_len=self.seq_len,
            batch=1,
        )
        # over every repetition, the fastest's (whose cost counts) included
        s["max_abs_err"] = max_err(
            outputs(res["values"][Role.DATA_OWNER]), self.reference(attention)
        )
        return s

    def plaintext(self, reps: int) -> dict[str, Any]:
        from secfwt.bench.shapes import hf_layer_fn

        return time_plaintext(hf_layer_fn(self.hf, self.x), reps=reps)


__all__ = ["Layer"]
