"""Cost of Safe Delta on shares for the example job's adapter
(``secfwt/jobs/smollm2_instruct_zo.toml``).

The job tunes a rank-1 LoRA of ``model.layers.29.self_attn.q_proj`` (576 x 576, scale 1) and the
final norm (not a Linear: Safe Delta leaves it as it is). Here the data owner inputs random LoRA
factors, the delta ``B @ A`` is formed on shares (outside the measured section, as the tuning
leaves it), and the model owner a random SPD Hessian of the right size (the real one comes from
the aligned layer's inputs on safety data, :mod:`secfwt.safety.safe_delta_run`; the cost does
not depend on its values). Measured: wall time of :func:`safe_delta_shares` on each computing
party and the traffic (payload bytes each way, rounds, bytes from the dealer).

Run: ``PYTHONPATH=. python -m tests.tuning.safe_delta_cost`` (prints JSON); the slow test in
``test_safe_delta_shares.py`` runs the same and checks the result against the plaintext.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from secfwt.tuning.safe_delta import DEFAULT_BUDGET, input_hessian, inverse_cholesky

SIZE = 576  # SmolLM2-135M's hidden size: q_proj is 576 x 576
RANK = 1
TOKENS, SAMPLES = 1024, 32  # calibration tokens for the random Hessian


def inputs(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The data owner's LoRA factors (B: 576 x 1, A: 1 x 576) and the model owner's Hessian
    of inputs with a few heavy channels, as a decoder's hidden states have."""
    gen = torch.Generator().manual_seed(seed)
    lora = {
        "b": 0.05 * torch.randn(SIZE, RANK, generator=gen),
        "a": torch.randn(RANK, SIZE, generator=gen) / SIZE**0.5,
    }
    channels = torch.exp(torch.randn(SIZE, generator=gen, dtype=torch.float64))
    x = torch.randn(TOKENS, SIZE, generator=gen, dtype=torch.float64) * channels
    return lora, input_hessian(x, samples=SAMPLES)


def party(ctx: PartyContext, payload: Any) -> dict[str, Any]:
    from secfwt.crypten_compat import crypten
    from secfwt.mpc.session import count_traffic
    from secfwt.tuning.safe_delta_shares import safe_delta_shares

    mine = ctx.role is Role.DATA_OWNER
    b = crypten.cryptensor(
        payload["b"] if mine else torch.zeros(SIZE, RANK), src=Role.DATA_OWNER.rank
    )
    a = crypten.cryptensor(
        payload["a"] if mine else torch.zeros(RANK, SIZE), src=Role.DATA_OWNER.rank
    )
    delta = b.matmul(a)  # scale 1
    meter = count_traffic()
    start = time.perf_counter()
    res = safe_delta_shares(delta, None if mine else payload["u"], owner=Role.MODEL_OWNER.rank)
    wall = time.perf_counter() - start
    traffic = dataclasses.asdict(meter.snapshot())
    return {
        "wall_s": wall,
        "traffic": traffic,
        # opened for the comparison with the plaintext only
        "delta_in": delta._tensor.reveal().double() / 2**16,
        "delta": res.delta._tensor.reveal().double() / 2**16,
        "kept": res.kept._tensor.reveal(),
    }


def measure(seed: int = 0) -> tuple[dict[Role, Any], torch.Tensor]:
    """Each computing party's measurements and opened values, and the model owner's Hessian."""
    lora, hessian = inputs(seed)
    results = run_parties(
        party,
        payloads={
            Role.DATA_OWNER: lora,
            Role.MODEL_OWNER: {"u": inverse_cholesky(hessian)},
        },
        provider=Provider.TTP,
        timeout_s=900,
    )
    return {role: r.value for role, r in results.items()}, hessian


def main() -> None:
    got, _ = measure()
    print(
        json.dumps(
            {
                "budget": DEFAULT_BUDGET,
                "kept": int(got[Role.DATA_OWNER]["kept"].sum()),
                **{
                    role.name.lower(): {"wall_s": got[role]["wall_s"], **got[role]["traffic"]}
                    for role in (Role.MODEL_OWNER, Role.DATA_OWNER)
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
