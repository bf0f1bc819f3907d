"""One party's handle on a running MPC job: sharing inputs, agreeing on public facts, seeds.

Only this module and the engine under :mod:`secfwt.mpc` create CrypTen tensors from party inputs;
reveals go through :class:`secfwt.mpc.disclosure.Discloser` only.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import FixedPointRangeError, ProtocolError
from secfwt.models.ops import SecureOps
from secfwt.models.spec import ModelSpec
from secfwt.mpc.disclosure import Discloser, DisclosureTerms
from secfwt.mpc.seeding import insecure_fixed_bytes
from secfwt.roles import Role

log = logging.getLogger(__name__)

#: Largest magnitude an input may have. CrypTen encodes with 16 fractional bits in an int64
#: ring and a product (scale 2^32) must stay below ~2^31 before truncation, so inputs are kept
#: well below sqrt(2^31) ~ 46341 times the largest partner they meet.
MAX_ABS_INPUT = 2.0**12


class PartySession:
    """What a computing party uses during a job."""

    def __init__(self, *, role: Role, terms: DisclosureTerms, audit_path: Path | None) -> None:
        self.role = role
        self.ops = SecureOps()
        self.discloser = Discloser(role=role, terms=terms, audit_path=audit_path)
        self._comm = crypten.communicator.get()

    # -- public facts ------------------------------------------------------------------------
    def broadcast(self, obj: Any, *, src: Role) -> Any:
        """Send a PUBLIC object (architecture, shapes, settings) from ``src`` to the other party."""
        return self._comm.broadcast_obj(obj if self.role is src else None, src.rank)

    def agree(self, obj: Any, *, what: str) -> None:
        """Both parties must hold the same public value (e.g. a terms digest); raise otherwise."""
        theirs = self.broadcast(obj, src=Role.MODEL_OWNER)
        mine_ok = theirs == obj
        both_ok = self.broadcast(mine_ok, src=Role.DATA_OWNER)
        if not (mine_ok and both_ok):
            raise ProtocolError(f"the parties disagree on {what}")

    def agree_spec(self, spec: ModelSpec | None) -> ModelSpec:
        d = self.broadcast(spec.to_dict() if spec is not None else None, src=Role.MODEL_OWNER)
        return ModelSpec.from_dict(d)

    def joint_seed(self) -> int:
        """A seed neither party chooses alone: commit to a random value, exchange, then open.

        Each party commits SHA-256(r_i) before seeing the other's r_j, so neither can bias the
        result (Blum's coin flipping by telephone, 1983). The seed is public to both parties.
        """
        # Tests of bit-identical reruns start the parties with insecure_fixed_seed; otherwise None.
        mine = insecure_fixed_bytes(f"joint_seed/{self.role.value}") or secrets.token_bytes(32)
        commit = hashlib.sha256(mine).hexdigest()
        c0 = self.broadcast(commit, src=Role.MODEL_OWNER)
        c1 = self.broadcast(commit, src=Role.DATA_OWNER)
        r0 = self.broadcast(mine, src=Role.MODEL_OWNER)
        r1 = self.broadcast(mine, src=Role.DATA_OWNER)
        if hashlib.sha256(r0).hexdigest() != c0 or hashlib.sha256(r1).hexdigest() != c1:
            raise ProtocolError(
                "joint seed: a party opened a value that does not match its commitment"
            )
        return int.from_bytes(hashlib.sha256(r0 + r1).digest()[:8], "little") & (2**62 - 1)

    # -- secret sharing ------------------------------------------------------------------------
    def share(
        self, value: torch.Tensor | None, *, owner: Role, shape: tuple[int, ...], name: str
    ) -> Any:
        """Secret-share ``value`` held by ``owner``; the other party passes None and the shape."""
        if self.role is owner:
            if value is None or tuple(value.shape) != tuple(shape):
                got = None if value is None else tuple(value.shape)
                raise ProtocolError(
                    f"{name}: owner's value has shape {got}, agreed shape is {tuple(shape)}"
                )
            check_fixed_point_range(value, name=name)
            return crypten.cryptensor(value.to(torch.float32), src=owner.rank)
        return crypten.cryptensor(torch.zeros(shape), src=owner.rank)

    def share_params(
        self,
        spec: ModelSpec,
        state: Mapping[str, torch.Tensor] | None,
        *,
        names: Iterable[str],
        frozen: bool = False,
    ) -> dict[str, Any]:
        """Secret-share the model owner's parameters ``names`` (in the spec's order).

        ``frozen``: the values never change during the job, so the linear weights among them stay
        with the model owner in the clear (:class:`~secfwt.mpc.owned.OwnedMatrix`: nothing is
        sent now; each weight's mask is opened once, at its first product, and every product
        then costs one x-sized message, where Beaver's opens x and W). Everything else, and
        every trainable value, is an ordinary secret sharing.
        """
        from secfwt.mpc.owned import OwnedMatrix

        wanted = set(names)
        out: dict[str, Any] = {}
        for name, shape in spec.param_shapes:
            if name not in wanted:
                continue
            value = None if state is None else state[name]
            if frozen and spec.is_linear_weight(name):
                if value is not None:
                    check_fixed_point_range(value, name=name)
                out[name] = OwnedMatrix.share(
                    value, owner=Role.MODEL_OWNER.rank, shape=shape, fixed_mask=True
                )
            else:
                out[name] = self.share(value, owner=Role.MODEL_OWNER, shape=shape, name=name)
        return out

    def public(self, value: torch.Tensor) -> Any:
        """A public constant as an MPC tensor (both parties know ``value``)."""
        return crypten.cryptensor(value.to(torch.float32), src=Role.MODEL_OWNER.rank)


def check_fixed_point_range(value: torch.Tensor, *, name: str) -> None:
    if not torch.isfinite(value).all():
        raise FixedPointRangeError(
            f"{name}: contains NaN or infinity; fix the input before sharing it"
        )
    m = float(value.abs().max()) if value.numel() else 0.0
    if m > MAX_ABS_INPUT:
        raise FixedPointRangeError(
            f"{name}: largest magnitude {m:.4g} exceeds {MAX_ABS_INPUT:g}, beyond which 16-bit "
            "fixed-point products "
            "overflow the int64 ring; rescale this input (or its weights) before sharing"
        )
