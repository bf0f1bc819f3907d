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
    ms = word.pow(2).mean(-1)
    recorder = RangeRecorder()
    recorder.rms_norm(word, weight=torch.ones(spec.hidden_size), eps=1e-6, mean_square_range=(1, 2))
    scores = torch.tensor([[3.0, -5.0, 100.0], [1.0, 2.5, -2.0]])
    recorder.softmax(scores, mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    recorder.silu(torch.tensor([-7.5, 2.0]))
    seen = recorder.layers[0]
    assert (seen.rms_mean_square_min, seen.rms_mean_square_max) == (ms.min(), ms.max())
    assert seen.rms_input_abs_max == word.abs().max()
    assert (seen.score_spread_max, seen.score_abs_max) == (8.0, 5.0)  # the masked 100 is not seen
    assert seen.silu_input_abs_max == 7.5

    recorder = RangeRecorder()  # a whole layer, padded rows included
    DecoderModel(spec, params, recorder, ForwardSettings()).layers(word, mask, stop=1)
    assert recorder.layers[0].rms_mean_square_min <= float(ms.min())
    assert recorder.uncovered(mean_square_range=RMS_MEAN_SQUARE_RANGE) == []
    narrow = (float(ms.max()) * 2, float(ms.max()) * 4)
    flagged = recorder.uncovered(mean_square_range=narrow)
    assert any("layer 0: RMSNorm mean squares" in m for m in flagged)
