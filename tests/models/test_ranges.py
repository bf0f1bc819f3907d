"""The range recorder sees what the secure nonlinearities will receive, and flags what they
cannot take."""

from __future__ import annotations

import torch

from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.decoder import RMS_MEAN_SQUARE_RANGE, DecoderModel
from secfwt.models.ranges import RangeRecorder
from secfwt.models.spec import Head
from secfwt.models.transformer import ForwardSettings, plain_params
from tests.conftest import save_random_decoder


def test_recorded_ranges_are_the_nonlinearities_inputs(tmp_path) -> None:
    spec, state = load_checkpoint(
        save_random_decoder(tmp_path / "llama"), head=Head.CAUSAL_LM, num_labels=0, seed=0
    )
    params = plain_params(state)
    ids = torch.randint(3, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.float64)
    mask[1, :4] = 0
    word = params[spec.word_embeddings][ids]
    recorder = RangeRecorder()
    model = DecoderModel(spec, params, recorder, ForwardSettings())
    model.layers(word, mask, stop=1)
    first = recorder.layers[0]
    ms = word.pow(2).mean(-1)  # layer 0's first RMSNorm reads the word embeddings, pads included
    assert first.rms_mean_square_min <= float(ms.min())
    assert first.rms_mean_square_max >= float(ms.max())
    assert first.rms_input_abs_max >= float(word.abs().max())
    assert 0 < first.score_spread_max and 0 < first.silu_input_abs_max
    assert recorder.uncovered(mean_square_range=RMS_MEAN_SQUARE_RANGE) == []
    narrow = (float(ms.max()) * 2, float(ms.max()) * 4)
    flagged = recorder.uncovered(mean_square_range=narrow)
    assert any("layer 0: RMSNorm mean squares" in m for m in flagged)
