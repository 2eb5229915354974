"""The real ECAPA model through `Embedder`: batching must not change results."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load16, model_dir, needs_model, needs_speakers, utterances
from diglett.decision import normalize

pytestmark = [needs_model, needs_speakers, pytest.mark.model]


@pytest.fixture(scope="module")
def embedder():
    from diglett.embedder import Embedder

    return Embedder.load(model_dir(), "cpu")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(normalize(a), normalize(b)))


def test_batch_equals_single_calls(embedder):
    u = utterances()
    x = load16(u["VCTK-p225"][0])
    windows = [x[i * 4000 : i * 4000 + 24000] for i in range(6)]
    # Unequal lengths in the same batch too: an enrollment and short windows.
    signals = windows + [x[:8000], x[:80000], x[100:16100]]
    batched = embedder.embed(signals)
    for s, b in zip(signals, batched):
        [single] = embedder.embed([s])
        assert b.shape == (192,)
        assert _cos(single, b) >= 0.9999


def test_tiny_signal_is_embedded(embedder):
    [e] = embedder.embed([np.full(10, 0.01, dtype=np.float32)])
    assert e.shape == (192,) and np.all(np.isfinite(e))
    with pytest.raises(ValueError):
        embedder.embed([np.zeros(0, dtype=np.float32)])


def test_same_speaker_scores_higher(embedder):
    u = utterances()
    a1, a2 = load16(u["VCTK-p226"][0]), load16(u["VCTK-p226"][1])
    b1 = load16(u["VCTK-p228"][0])
    ea1, ea2, eb1 = embedder.embed([a1, a2, b1])
    assert _cos(ea1, ea2) > 0.5 > _cos(ea1, eb1)


def test_int16_transport_keeps_embeddings(embedder):
    """Windows cross from SessionActors to the tier as int16; resampled
    (non-16-bit) audio loses nothing the model notices."""
    from diglett.audio import resample, to_float32, to_int16

    u = utterances()
    x = resample(load16(u["LS-26"][1])[: 4 * 16000], 16000)  # float, any value
    y = resample(np.repeat(x, 3)[: 3 * 48000], 48000)  # 48 kHz → 16 kHz
    for w in (x[:24000], y[8000:32000]):
        [a] = embedder.embed([w])
        [b] = embedder.embed([to_float32(to_int16(w))])
        assert _cos(a, b) >= 0.9999
