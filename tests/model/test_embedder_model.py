"""The real ECAPA model through `Embedder`: batching must not change results."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load16, model_dir, needs_model, needs_speakers, utterances
from diglett.engine.decision import normalize

pytestmark = [needs_model, needs_speakers, pytest.mark.model]


@pytest.fixture(scope="module")
def embedder():
    from diglett.model.embedder import Embedder

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
    from diglett.engine.audio import resample, to_float32, to_int16

    u = utterances()
    x = resample(load16(u["LS-26"][1])[: 4 * 16000], 16000)  # float, any value
    y = resample(np.repeat(x, 3)[: 3 * 48000], 48000)  # 48 kHz → 16 kHz
    for w in (x[:24000], y[8000:32000]):
        [a] = embedder.embed([w])
        [b] = embedder.embed([to_float32(to_int16(w))])
        assert _cos(a, b) >= 0.9999


def test_int16_rows_are_scaled_as_the_float_path_does(embedder):
    """int16 windows are stacked as int16 and scaled in torch (on a GPU, on
    the device): the same numbers as converting each window first."""
    from diglett.engine.audio import to_float32, to_int16

    u = utterances()
    x = load16(u["LS-26"][1])
    ints = [to_int16(x[i * 8000 : i * 8000 + 24000]) for i in range(3)]
    as_int16 = embedder.embed(ints)
    as_float = embedder.embed([to_float32(w) for w in ints])
    for a, b in zip(as_int16, as_float):
        assert np.array_equal(a, b)
    # Mixed in one call: each kind is its own group, results unchanged.
    mixed = embedder.embed([ints[0], to_float32(ints[1]), ints[2]])
    for a, b in zip(mixed, as_int16):
        assert _cos(a, b) >= 0.99999


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_padding_to_batch_shapes_leaves_embeddings_unchanged(precision):
    """A batch padded with copies of its first row (GPU replicas' fixed
    shapes) gives its real rows the embeddings they get unpadded; int8's
    per-batch scale does not move either (copies add no new range)."""
    from diglett.engine.audio import to_int16
    from diglett.model.embedder import Embedder

    emb = Embedder.load(model_dir(), "cpu", precision)
    u = utterances()
    x = load16(u["VCTK-p226"][0])
    windows = [to_int16(x[i * 4000 : i * 4000 + 24000]) for i in range(5)]
    plain = emb.embed(windows)
    emb.set_batch_shapes((2, 8))
    assert emb.max_batch == 8
    assert emb.warm_up(24000) > 0
    padded = emb.embed(windows)  # 5 rows run as 8
    for a, b in zip(plain, padded):
        assert _cos(a, b) >= 0.9999
    many = emb.embed(windows * 2)  # 10 rows: 8 and 2, other neighbours
    # int8 scales activations per batch, so other neighbours move a window
    # a little (README: cosine >= 0.99); float32 does not care.
    bound = 0.9999 if precision == "fp32" else 0.99
    for a, b in zip(plain * 2, many):
        assert _cos(a, b) >= bound
    # Shapes set again (a replica's start, then its user_config) warm up
    # only the new one.
    runs: list[int] = []
    run = emb._run
    emb._run = lambda rows: runs.append(len(rows)) or run(rows)
    emb.set_batch_shapes((2, 4, 8))
    emb.warm_up(24000)
    assert runs == [4]
