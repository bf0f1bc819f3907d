"""Activation ranges at the inputs of the MPC nonlinearities, recorded on the plaintext forward.

The secure nonlinearities are accurate only on stated input ranges (:mod:`secfwt.mpc.nonlinear`):
RMSNorm on row mean squares in :data:`~secfwt.models.decoder.RMS_MEAN_SQUARE_RANGE`, the
comparisons inside softmax and SiLU for magnitudes below ``CMP_RANGE`` (2^15), softmax for row
spreads below ``CMP_RANGE - SOFTMAX_MASK_OFFSET``. :class:`RangeRecorder` runs the same model code
in float64 and records, per layer, what each of them receives, including padded rows (they go
through the same secure functions); :meth:`RangeRecorder.uncovered` lists what falls outside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from secfwt.models.ops import PlainOps
from secfwt.mpc.nonlinear import CMP_RANGE, SOFTMAX_MASK_OFFSET


@dataclasses.dataclass
class LayerRanges:
    """Extremes seen at one layer (or the final norm, layer = number of layers)."""

    rms_mean_square_min: float = float("inf")
    rms_mean_square_max: float = 0.0
    rms_input_abs_max: float = 0.0
    score_abs_max: float = 0.0  # attention scores q.k / sqrt(dh) on kept keys
    score_spread_max: float = 0.0  # max - min of a softmax row's kept scores
    silu_input_abs_max: float = 0.0  # the gate of the gated MLP

    def as_dict(self) -> dict[str, float | None]:
        return {k: (v if v != float("inf") else None) for k, v in dataclasses.asdict(self).items()}


class RangeRecorder(PlainOps):
    """:class:`PlainOps` that also records its nonlinearities' inputs under ``self.layer``."""

    def __init__(self) -> None:
        self.layer = 0
        self.layers: dict[int, LayerRanges] = {}

    def _at(self) -> LayerRanges:
        return self.layers.setdefault(self.layer, LayerRanges())

    def rms_norm(self, x, *, weight, eps, mean_square_range):
        r = self._at()
        ms = x.pow(2).mean(-1)
        r.rms_mean_square_min = min(r.rms_mean_square_min, float(ms.min()))
        r.rms_mean_square_max = max(r.rms_mean_square_max, float(ms.max()))
        r.rms_input_abs_max = max(r.rms_input_abs_max, float(x.abs().max()))
        return super().rms_norm(x, weight=weight, eps=eps, mean_square_range=mean_square_range)

    def softmax(self, x, *, mask):
        r = self._at()
        keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x) > 0
        hi = x.masked_fill(~keep, float("-inf")).amax(-1)
        lo = x.masked_fill(~keep, float("inf")).amin(-1)
        r.score_abs_max = max(r.score_abs_max, float(x[keep].abs().max()))
        r.score_spread_max = max(r.score_spread_max, float((hi - lo).max()))
        return super().softmax(x, mask=mask)

    def silu(self, x):
        r = self._at()
        r.silu_input_abs_max = max(r.silu_input_abs_max, float(x.abs().max()))
        return super().silu(x)

    def summary(self) -> dict[str, Any]:
        return {str(i): r.as_dict() for i, r in sorted(self.layers.items())}

    def uncovered(self, *, mean_square_range: tuple[float, float]) -> list[str]:
        """Every recorded range outside what the secure nonlinearities accept (empty: covered)."""
        lo, hi = mean_square_range
        out = []
        for i, r in sorted(self.layers.items()):
            if (
                r.rms_mean_square_max
                and not lo <= r.rms_mean_square_min <= r.rms_mean_square_max <= hi
            ):
                out.append(
                    f"layer {i}: RMSNorm mean squares {r.rms_mean_square_min:.3g}.."
                    f"{r.rms_mean_square_max:.3g} outside [{lo:.3g}, {hi:.3g}]"
                )
            if r.score_spread_max + SOFTMAX_MASK_OFFSET >= CMP_RANGE:
                out.append(f"layer {i}: softmax row spread {r.score_spread_max:.3g} too wide")
            if r.silu_input_abs_max >= CMP_RANGE:
                out.append(f"layer {i}: SiLU input {r.silu_input_abs_max:.3g} beyond 2^15")
        return out
