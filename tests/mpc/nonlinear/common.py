"""Shared harness of the reference tests of secfwt.mpc.nonlinear: inputs, sharing, party runs.

Multi-process tests run the real protocol (model owner rank 0, data owner rank 1, dealer = CrypTen
TTP at rank 2). Start-up costs ~5 s per run, so each run checks several functions: one run for
the element-wise functions (``test_elementwise``), one for softmax and the normalisation layers
(``test_layers``). The data owner provides the activations (``src=1``), the model owner the
LayerNorm weights (``src=0``). References are computed on the fixed-point encoding CrypTen
actually shares (it truncates toward zero), so the errors measured are those of the protocols,
not of the input encoding.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from secfwt.mpc import nonlinear as nl
from secfwt.mpc.launcher import run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role

log = logging.getLogger(__name__)


TIMEOUT_S = 600.0


def _encoded(t: torch.Tensor) -> torch.Tensor:
    """The value CrypTen shares for ``t``: ``(2^16 t).long()`` truncates toward zero."""
    return torch.trunc(t.double() * 2**nl.FRAC_BITS) / 2**nl.FRAC_BITS


def _elementwise_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    outliers = torch.tensor([50.0, -50.0, 1000.0, -1000.0, 4.0, -4.0, 3.97, -3.97, 9.8, -9.8, 0.0])
    return {
        # x <= 0: softmax range, the cut at -15.5, and values CrypTen's exp turns into garbage
        "exp": torch.cat(
            [
                -torch.rand(30000, generator=g) * 20,
                -torch.rand(10000, generator=g),
                torch.tensor([-1e4, -300.0, -15.6, -15.4, 0.0]),
            ]
        ),
        "act": torch.cat([torch.randn(30000, generator=g) * 5, outliers]),
        # log-uniform over the full stated range [2^-10, 2^20]
        "pos": torch.exp2(torch.rand(20000, generator=g) * 30 - 10),
        # signs: the whole comparison range, its edges and the ambiguous band around 0
        "signs": torch.cat(
            [
                (torch.rand(3000, generator=g) * 2 - 1) * (nl.CMP_RANGE - 1),
                torch.tensor([nl.CMP_RANGE - 2**-5, -nl.CMP_RANGE + 2**-5, nl.CMP_RESOLUTION]),
                torch.tensor([-nl.CMP_RESOLUTION, -(2.0**-16), 0.0, 2.0**-16, -1.0, 1.0]),
                torch.randn(3000, generator=g) * 0.1,
            ]
        ).reshape(3, 2003),
    }


def _one_thread() -> None:
    """Three party processes share 2 cores: torch's default 2 intra-op threads per process then
    wait at every op's barrier (a 1.6 MB copy took 8 ms instead of 0.1 ms under load), so each
    party computes on one thread."""
    torch.set_num_threads(1)


def _share(
    tensors: dict[str, torch.Tensor], name: str, shapes: dict[str, tuple[int, ...]], src: int
) -> Any:
    """Share ``tensors[name]`` from party ``src``; the other party only knows the shape."""
    from secfwt.crypten_compat import crypten

    value = tensors.get(name)
    return crypten.cryptensor(value if value is not None else torch.zeros(shapes[name]), src=src)


def _run(
    target: Any, data: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], **extra: Any
) -> dict[str, Any]:
    shapes = {k: tuple(v.shape) for k, v in {**data, **weights}.items()}
    payloads = {
        Role.DATA_OWNER: {"data": data, "weights": {}, "shapes": shapes, **extra},
        Role.MODEL_OWNER: {"data": {}, "weights": weights, "shapes": shapes, **extra},
    }
    results = run_parties(target, payloads=payloads, provider=Provider.TTP, timeout_s=TIMEOUT_S)
    return results[Role.DATA_OWNER].value


def _max_err(got: torch.Tensor, ref: torch.Tensor, label: str) -> float:
    err = float((got.double() - ref.double()).abs().max())
    log.info("%s: max abs error %.2e", label, err)
    return err
