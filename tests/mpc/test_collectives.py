"""Two-party collectives as direct exchanges over gloo (:mod:`secfwt.mpc.collectives`).

One TTP session (model owner, data owner, dealer) per setting checks that CrypTen's
communicator, as patched, gives bit for bit what gloo's own collectives give:

* ``all_reduce`` (SUM with int64 wrap-around, BXOR; single and batched, non-contiguous input)
  equals ``torch.distributed.all_reduce`` on a copy, and leaves its input untouched; a batch
  small enough to travel packed, one over :data:`~secfwt.mpc.collectives.PACK_MAX_ELEMENTS` and
  one of mixed dtypes alike; a small batch is one message each way, a large one one per tensor;
* ``broadcast`` from either party delivers the source's tensor (the exchange also into a
  non-contiguous destination, which gloo's own broadcast leaves unwritten), and a float SUM
  equals gloo's;
* a Beaver product (whose dealer reply is a two-member ``broadcast``) still opens to exactly
  ``torch.matmul`` of the encoded inputs;
* with ``SECFWT_RING_MATMUL=0`` CrypTen's own collectives and random draws run (the vanilla
  baseline; :mod:`secfwt.mpc.keystream` is off too).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role

pytestmark = pytest.mark.multiprocess

BIG = 2**62  # sums of two such values wrap around 2^63


def party(ctx: PartyContext, payload: None) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed import ReduceOp

    from secfwt.crypten_compat import crypten

    comm = crypten.communicator.get()
    rank = comm.get_rank()
    g = torch.Generator().manual_seed(100 + rank)  # each party its own values
    from crypten.common import rng

    two_party = bool(getattr(type(comm).all_reduce, "_secfwt_two_party", False))
    keystream = bool(getattr(rng.generate_random_ring_element, "_secfwt_keystream", False))
    out: dict[str, Any] = {
        "patched": two_party and keystream,
        "unpatched": not (two_party or keystream),
        "checks": {},
    }

    def gloo(t: torch.Tensor, op: Any) -> torch.Tensor:
        ref = t.clone().contiguous()
        dist.all_reduce(ref, op=op, group=comm.main_group)
        return ref

    for name, op in (("sum", ReduceOp.SUM), ("bxor", ReduceOp.BXOR)):
        x = torch.randint(-BIG, BIG, (33, 7), generator=g, dtype=torch.int64)
        before = x.clone()
        got = comm.all_reduce(x, op=op)
        out["checks"][f"{name} single"] = torch.equal(got, gloo(before, op)) and torch.equal(
            x, before
        )
        xs = [
            torch.randint(-BIG, BIG, s, generator=g, dtype=torch.int64)
            for s in ((5,), (4, 6), (2, 3, 2))
        ]
        got = comm.all_reduce(xs, op=op, batched=True)
        out["checks"][f"{name} batched"] = all(
            torch.equal(a, gloo(b, op)) for a, b in zip(got, xs, strict=True)
        )
        # over PACK_MAX_ELEMENTS in all: tensor by tensor, not packed
        large = [
            torch.randint(-BIG, BIG, (n,), generator=g, dtype=torch.int64) for n in (9000, 8000)
        ]
        got = comm.all_reduce(large, op=op, batched=True)
        out["checks"][f"{name} batched large"] = all(
            torch.equal(a, gloo(b, op)) for a, b in zip(got, large, strict=True)
        )
        nc = torch.randint(-BIG, BIG, (6, 8), generator=g, dtype=torch.int64).t()  # non-contiguous
        out["checks"][f"{name} non-contiguous"] = torch.equal(
            comm.all_reduce(nc, op=op), gloo(nc, op)
        )
    f = torch.randn(17, generator=g, dtype=torch.float64)
    out["checks"]["float sum"] = torch.equal(comm.all_reduce(f), gloo(f, ReduceOp.SUM))
    mixed = [torch.randint(-BIG, BIG, (5,), generator=g, dtype=torch.int64), f * 3]
    got = comm.all_reduce(mixed, batched=True)
    out["checks"]["mixed dtypes batched"] = all(
        torch.equal(a, gloo(b, ReduceOp.SUM)) for a, b in zip(got, mixed, strict=True)
    )
    # messages per direction for a small batch of three tensors (packed: one) and a large one
    sends: list[int] = []
    real_isend = dist.isend

    def counting_isend(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sends.append(tensor.numel())
        return real_isend(tensor, *args, **kwargs)

    dist.isend = counting_isend  # type: ignore[assignment]
    try:
        comm.all_reduce(xs, batched=True)
        out["messages small batch"] = len(sends)
        sends.clear()
        comm.all_reduce(large, batched=True)
        out["messages large batch"] = len(sends)
    finally:
        dist.isend = real_isend

    # gloo's own broadcast leaves a non-contiguous destination unwritten; the exchange fills it
    layouts = ("contiguous", "non-contiguous") if out["patched"] else ("contiguous",)
    for src in (0, 1):
        for layout in layouts:
            mine = torch.arange(12, dtype=torch.int64).reshape(3, 4) * (7 + src)
            empty = (
                torch.zeros(3, 4, dtype=torch.int64)
                if layout == "contiguous"
                else torch.zeros(4, 3, dtype=torch.int64).t()
            )
            dest = mine.clone() if rank == src else empty
            comm.broadcast(dest, src)
            out["checks"][f"broadcast from {src}, {layout}"] = torch.equal(dest, mine)

    x = crypten.cryptensor(torch.randn(8, 16, generator=g), src=Role.DATA_OWNER.rank)
    w = crypten.cryptensor(torch.randn(16, 4, generator=g), src=Role.MODEL_OWNER.rank)
    from crypten.mpc.primitives import beaver

    raw = beaver.matmul(x._tensor, w._tensor).reveal()
    out["checks"]["beaver product exact"] = torch.equal(
        raw, torch.matmul(x._tensor.reveal(), w._tensor.reveal())
    )
    return out


@pytest.mark.parametrize("engine", ["secfwt", "vanilla"])
def test_two_party_collectives_match_gloo_bit_for_bit(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if engine == "vanilla":
        monkeypatch.setenv("SECFWT_RING_MATMUL", "0")  # inherited by the spawned parties and dealer
    results = run_parties(
        party,
        payloads={Role.MODEL_OWNER: None, Role.DATA_OWNER: None},
        provider=Provider.TTP,
        timeout_s=180,
    )
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        value = results[role].value
        assert value["patched"] if engine == "secfwt" else value["unpatched"], role
        failed = [name for name, ok in value["checks"].items() if not ok]
        assert not failed, f"{role.value}: {failed}"
        if engine == "secfwt":  # a small batch is one message each way, a large one per tensor
            assert (value["messages small batch"], value["messages large batch"]) == (1, 2), role
