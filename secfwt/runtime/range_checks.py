"""Range checks of secure values against a failed fixed-point truncation: each row of a secure
computation is checked against a bound, one bit per row revealed to both parties (the
``range_check`` term), and a row that failed is computed again with fresh randomness.

CrypTen's 2-party truncation is local (SecureML, Mohassel and Zhang, S&P 2017, section 4.1): it
fails with probability about |v| / 2^64 for the ring value v it truncates and then adds about
2^64 / 2^16 = 2^48 to the ring value, 2^48 / 2^16 = 2^32 in real units. Such a value is far
outside anything a model computes, so a bound between the two finds it. Every job checks the
rows of its frozen prefix (hidden states, :data:`RANGE_BOUND`) and of each step's and each
evaluation's secure forward: a causal job the hidden states of its upper layers and its
per-row response losses, a classification job its logits (evaluations), or its per-example
losses with the logits' differences they depend on (steps) (:data:`OUTPUT_BOUND`).

A failure that only perturbs a value a little (or one a later normalization squashes) is not
seen; the check catches the failures that blow a value up (the usual outcome, and the harmful
one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from secfwt.errors import ProtocolError
from secfwt.mpc.disclosure import Revealable
from secfwt.roles import Role
from secfwt.runtime.session import PartySession
from secfwt.tuning.guard import Guard

log = logging.getLogger(__name__)

#: Largest |value| a secure hidden state may hold. Real activations stay far below it
#: (SmolLM2's massive channel: 2.5e4), a failure's 2^32 far above it; a masked key's garbage
#: score then poisons every query of its row (measured on the packaged SmolLM2: 3 failures in 9
#: prefixes of 32 rows x 48 tokens x 30 layers, about 7e-6 per token and layer). Not lower:
#: hidden states carry massive activations near 2^15 and no comparison reads them directly.
RANGE_BOUND = 2.0**20
#: Largest |value| a classification job's logits and per-example losses may hold: the range of
#: secfwt's secure comparisons (``secfwt.mpc.nonlinear.compare.CMP_RANGE``, 2^15), which the
#: loss's row max, the exp's clamp and the accuracy's argmax apply to them, so a value beyond
#: it is computed wrong in MPC anyway and flagging it loses nothing. Real logits are O(10) and
#: a loss at most twice the largest logit gap plus log C; tighter than :data:`RANGE_BOUND`, so
#: a failure upstream of the classifier still shows when a weight as small as 2^-17 (the init's
#: std is 0.02) scales it down.
OUTPUT_BOUND = 2.0**15
#: Computations of a row before the job gives up (each fails independently).
RANGE_ATTEMPTS = 3


class RangeChecks:
    """Rows of secure values checked against a bound, one bit per row revealed to both parties
    (the ``range_check`` term), and computed again, with fresh randomness, where they failed;
    :attr:`recomputed` counts those rows over the job."""

    def __init__(self, sess: PartySession) -> None:
        self.sess = sess
        self.recomputed = 0

    def guard(self, *, what: str, bound: float) -> Guard:
        """The :data:`~secfwt.tuning.guard.Guard` of a step's or an evaluation's secure forward:
        :meth:`rows` in one batch."""

        def checked(compute: Callable[[list[int]], Any], n: int) -> Any:
            return self.rows(compute, n=n, batch=n, what=what, bound=bound)

        return checked

    def prefix(
        self,
        compute: Callable[[list[int]], Any],
        *,
        n: int,
        batch: int,
        progress: Callable[..., None],
    ) -> Any:
        """The frozen prefix's rows 0 .. n-1 (hidden states, :data:`RANGE_BOUND`), ``batch`` at a
        time, reporting ``progress(kind="prefix", ...)`` after each chunk."""
        t0 = time.perf_counter()

        def report(done: int) -> None:
            progress(kind="prefix", done=done, total=n, elapsed=time.perf_counter() - t0)

        return self.rows(
            compute, n=n, batch=batch, what="frozen prefix", bound=RANGE_BOUND, on_chunk=report
        )

    def rows(
        self,
        compute: Callable[[list[int]], Any],
        *,
        n: int,
        batch: int,
        what: str,
        bound: float,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Any:
        """Rows 0 .. n-1 of ``compute(rows)`` (dim 0: the rows), ``batch`` rows at a time, each
        checked against ``|value| <= bound`` (and computed again where it failed);
        ``on_chunk(rows done)`` after each chunk of the first pass."""
        from secfwt.mpc.nonlinear import rows_out_of_range

        both = [Role.MODEL_OWNER, Role.DATA_OWNER]
        kept: dict[int, Any] = {}
        todo = list(range(n))
        for attempt in range(RANGE_ATTEMPTS):
            failed: list[int] = []
            for s in range(0, len(todo), batch):
                rows = todo[s : s + batch]
                part = compute(rows)
                flags = self.sess.discloser.reveal(
                    rows_out_of_range(part, bound),
                    value=Revealable.RANGE_CHECK,
                    to=both,
                    note=f"{what}: rows {rows[0]}..{rows[-1]}, attempt {attempt + 1}",
                )
                assert flags is not None  # revealed to both parties
                for i, row in enumerate(rows):
                    if bool(flags[i]):
                        failed.append(row)
                    else:
                        kept[row] = part[i : i + 1]
                if attempt == 0 and on_chunk is not None:
                    on_chunk(s + len(rows))
            if not failed:
                break
            todo = failed
            if attempt + 1 < RANGE_ATTEMPTS:  # else no attempt left: the error below
                self.recomputed += len(failed)
                log.warning(
                    "range check (%s): %d row(s) left the value range (a truncation failure); "
                    "computing them again (attempt %d of %d)",
                    what,
                    len(failed),
                    attempt + 2,
                    RANGE_ATTEMPTS,
                )
        else:
            raise ProtocolError(
                f"{what}: {len(todo)} row(s) failed the range check |value| <= {bound:g} "
                f"{RANGE_ATTEMPTS} times: a value this large in every attempt is the run's own "
                "(diverged training: lower zo.lr) rather than a truncation failure; otherwise "
                "rerun the job"
            )
        return self.sess.ops.cat([kept[i] for i in range(n)], dim=0)
