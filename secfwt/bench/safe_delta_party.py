"""The party side of ``secfwt bench safe-delta`` (inside each party process).

The data owner shares the tuned delta (in a job it is already shared when tuning ends), the
model owner keeps ``U`` in the clear; one measured section runs
:func:`secfwt.tuning.safe_delta_shares.safe_delta_shares`. The corrected delta and the kept mask
are revealed to the data owner only (``verify_outputs``), for the plaintext check.
"""

from __future__ import annotations

from typing import Any

from secfwt.bench.probe import measure_reps
from secfwt.mpc.disclosure import Revealable
from secfwt.mpc.launcher import PartyContext
from secfwt.mpc.traffic import TrafficMeter
from secfwt.roles import Role


def safe_delta(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """Safe Delta of one Linear on shares: ``payload["shape"]`` (out, in), budget ``s``."""
    from secfwt.tuning.safe_delta_shares import safe_delta_shares

    shape = tuple(payload["shape"])
    delta = sess.share(payload.get("delta"), owner=Role.DATA_OWNER, shape=shape, name="delta")
    u = payload.get("u")

    def fn() -> Any:
        return safe_delta_shares(delta, u, owner=Role.MODEL_OWNER.rank, s=payload["budget"])

    res, costs = measure_reps(comm, meter, fn, reps=1)
    out = {}
    for key, x in (("output", res.delta), ("kept", res.kept)):
        out[key] = sess.discloser.reveal(
            x, value=Revealable.VERIFY_OUTPUTS, to=[Role.DATA_OWNER], note=f"safe delta {key}"
        )
    return {"costs": costs, **out}
