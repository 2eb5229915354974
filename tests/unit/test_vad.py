"""Streaming Silero VAD (diglett.engine.vad) on real speech: onnxruntime, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load16, needs_speakers, utterances  # noqa: E402

from diglett.engine import vad  # noqa: E402

pytestmark = [needs_speakers]

SR = 16000


def active_level_dbfs(x: np.ndarray) -> float:
    """Power mean of the loudest half of the 20 ms frames (as bench/)."""
    n = x.size // 320
    ms = np.mean(np.square(x[: n * 320].reshape(n, 320), dtype=np.float64), 1)
    top = np.sort(ms)[n // 2 :]
    return float(10 * np.log10(np.mean(top)))


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * 10 ** ((dbfs - active_level_dbfs(x)) / 20)).astype(np.float32)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """About 3 s of one real utterance, shape (n,)."""
    spk = sorted(utterances().items())[0][1]
    return load16(spk[0])[: 3 * SR]


def fraction(x: np.ndarray) -> float:
    v = vad.create()
    v.push(x)
    return v.speech_fraction(0, x.size)


@pytest.mark.parametrize("dbfs", [-45.0, -12.0])
def test_speech_is_detected_at_quiet_and_loud_levels(speech, dbfs):
    assert fraction(at_level(speech, dbfs)) > 0.6


def test_silence_is_not_speech():
    x = np.zeros(2 * SR, np.float32)
    v = vad.create()
    v.push(x)
    assert v.speech_fraction(0, x.size) == 0.0
    assert not v.is_speech(0, x.size)


def test_white_noise_at_minus_60_dbfs_is_not_speech():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(2 * SR) * 10 ** (-60 / 20)).astype(np.float32)
    assert fraction(x) < 0.1


def test_odd_sized_pushes_match_one_push(speech):
    whole = vad.create()
    whole.push(speech)
    pieces = vad.create()
    rng = np.random.default_rng(1)
    pos = 0
    while pos < speech.size:
        n = int(rng.integers(1, 2000))
        pieces.push(speech[pos : pos + n])
        pos += n
    assert pieces.frames == whole.frames == speech.size // vad.FRAME_SAMPLES
    np.testing.assert_allclose(
        pieces.frame_probs(0, speech.size), whole.frame_probs(0, speech.size), atol=1e-6
    )
    for start in range(0, speech.size - 8000, 8000):
        assert pieces.speech_fraction(start, start + 8000) == pytest.approx(
            whole.speech_fraction(start, start + 8000)
        )


def test_frame_queries_cover_the_sample_range(speech):
    v = vad.create()
    v.push(speech[:24000])  # 1.5 s: 46 whole frames, 448 samples left over
    assert v.frames == 46 and v.scored_samples == 46 * 512
    assert v.frame_range(8000, 16000) == (15, 32)  # frames overlapping the hop
    flags = v.frame_flags(0, 24000)
    assert flags.shape == (46,) and flags.dtype == bool
    assert 0.0 <= v.speech_fraction(16000, 24000) <= 1.0


def test_reset_clears_state(speech):
    fresh = vad.create()
    fresh.push(speech)
    v = vad.create()
    v.push(speech[:10_000])
    v.reset()
    assert v.frames == 0 and v.frame_probs(0, speech.size).size == 0
    v.push(speech)
    np.testing.assert_array_equal(
        v.frame_probs(0, speech.size), fresh.frame_probs(0, speech.size)
    )


def test_raise_probs_raises_only_kept_scored_frames_and_keeps_the_state(speech):
    quiet = at_level(speech, -60.0)
    v, fresh = vad.create(), vad.create()
    v.push(quiet[:16000])  # 31 whole frames
    before = v.frame_probs(0, 16000)
    v.raise_probs(29, np.array([1.0, 0.0, 1.0], np.float32))  # 29, 30, 31
    after = v.frame_probs(0, 16000)
    assert after[29] == 1.0 and after[30] == before[30]  # never lowered
    np.testing.assert_array_equal(after[:29], before[:29])
    assert after.size == before.size == 31  # frame 31 is not scored yet
    # the recurrent state is the stream's own: later frames as without it
    v.push(quiet[16000:])
    fresh.push(quiet)
    np.testing.assert_array_equal(
        v.frame_probs(16384, quiet.size), fresh.frame_probs(16384, quiet.size)
    )


def test_session_is_loaded_once_per_process():
    assert vad.load_session() is vad.load_session()
    assert vad.create()._session is vad.create()._session
