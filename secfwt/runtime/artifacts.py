"""What a party keeps at the end of a job: tuned parameters revealed per terms, local values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from secfwt.mpc.disclosure import Revealable
from secfwt.runtime.session import PartySession


def deliver(
    sess: PartySession, theta: dict[str, Any], local: dict[str, torch.Tensor], out_dir: Path
) -> dict[str, str]:
    """Reveal the tuned parameters to the owners the terms name and save them there.

    ``local`` holds values this party already owns in the clear (the data owner's prompt in
    SecFwT mode); they are saved without any reveal.
    """
    to = sess.discloser.terms.recipients(Revealable.FINAL_PARAMETERS)
    saved: dict[str, str] = {}
    if local:
        path = out_dir / "prompt.pt"
        torch.save(local, path)
        saved["prompt"] = str(path)
    if not to:
        return saved
    values = {}
    for name, x in theta.items():
        v = sess.discloser.reveal(x, value=Revealable.FINAL_PARAMETERS, to=to, note=name)
        if v is not None:
            values[name] = v
    if values:
        path = out_dir / "final_parameters.pt"
        torch.save(values, path)
        saved["final_parameters"] = str(path)
    return saved
