"""Sound levels and the energy gate (diglett.engine.levels): pure numpy, no model."""

from __future__ import annotations

import numpy as np
import pytest

from diglett.engine import levels
from diglett.engine.levels import FRAME_SAMPLES, SILENCE_DBFS

SR = 16000


def sine(freq: float, seconds: float, amp: float = 1.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ------------------------------------------------------------------ rms_dbfs
def test_full_scale_sine_is_minus_3_dbfs():
    assert levels.rms_dbfs(sine(1000, 1.0)) == pytest.approx(-3.0103, abs=0.01)


def test_full_scale_square_is_0_dbfs():
    x = np.where(np.arange(16000) % 32 < 16, 1.0, -1.0).astype(np.float32)
    assert levels.rms_dbfs(x) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("amp", [0.5, 0.1, 0.01, 0.001])
def test_sine_level_scales_with_amplitude(amp):
    expected = 20 * np.log10(amp) - 3.0103
    assert levels.rms_dbfs(sine(440, 0.5, amp)) == pytest.approx(expected, abs=0.02)


def test_digital_silence_is_minus_120():
    assert levels.rms_dbfs(np.zeros(8000, dtype=np.float32)) == SILENCE_DBFS == -120.0


def test_empty_signal_is_minus_120():
    assert levels.rms_dbfs(np.zeros(0, dtype=np.float32)) == -120.0


def test_tiny_signal_is_floored_at_minus_120():
    assert levels.rms_dbfs(np.full(100, 1e-9, dtype=np.float32)) == -120.0


def test_one_lsb_is_above_floor():
    x = np.full(1000, 1 / 32768, dtype=np.float32)
    assert levels.rms_dbfs(x) == pytest.approx(-90.31, abs=0.01)


def test_rms_dbfs_returns_plain_float():
    assert isinstance(levels.rms_dbfs(sine(440, 0.1, 0.3)), float)


# ----------------------------------------------------------------- frame_dbfs
def test_frame_dbfs_one_value_per_20ms_frame():
    x = sine(440, 1.0, 0.5)
    db = levels.frame_dbfs(x)
    assert db.shape == (50,)
    assert np.all(np.abs(db - (20 * np.log10(0.5) - 3.01)) < 0.1)


def test_frame_dbfs_partial_tail_counts_when_at_least_half_a_frame():
    x = np.full(FRAME_SAMPLES * 2 + FRAME_SAMPLES // 2, 0.5, dtype=np.float32)
    assert levels.frame_dbfs(x).shape == (3,)
    x = np.full(FRAME_SAMPLES * 2 + FRAME_SAMPLES // 2 - 1, 0.5, dtype=np.float32)
    assert levels.frame_dbfs(x).shape == (2,)


def test_frame_dbfs_short_and_empty():
    assert levels.frame_dbfs(np.zeros(0, dtype=np.float32)).shape == (0,)
    assert levels.frame_dbfs(np.full(100, 0.5, dtype=np.float32)).shape == (0,)
    assert levels.frame_dbfs(np.full(200, 0.5, dtype=np.float32)).shape == (1,)


def test_frame_dbfs_silence_floor():
    db = levels.frame_dbfs(np.zeros(3200, dtype=np.float32))
    assert np.all(db == -120.0)


# ----------------------------------------------------------------------- gate
def test_speech_frames_mask_follows_gate():
    loud = np.full(FRAME_SAMPLES * 3, 0.1, dtype=np.float32)  # -20 dBFS
    quiet = np.full(FRAME_SAMPLES * 2, 0.001, dtype=np.float32)  # -60 dBFS
    mask = levels.speech_frames(np.concatenate([loud, quiet]), -50.0)
    assert mask.tolist() == [True, True, True, False, False]


def test_gate_is_inclusive_at_threshold():
    amp = 10 ** (-50 / 20)
    x = np.full(FRAME_SAMPLES, amp, dtype=np.float64).astype(np.float32)
    level = levels.frame_dbfs(x)[0]
    assert levels.speech_frames(x, float(level)).tolist() == [True]
    assert levels.speech_frames(x, float(level) + 0.01).tolist() == [False]


def test_speech_seconds_counts_gated_frames():
    x = np.concatenate(
        [
            sine(300, 1.0, 0.3),
            np.zeros(SR // 2, dtype=np.float32),
            sine(300, 0.5, 0.3),
        ]
    )
    assert levels.speech_seconds(x, -50.0) == pytest.approx(1.5, abs=0.021)
    assert levels.speech_seconds(np.zeros(SR, dtype=np.float32), -50.0) == 0.0
    assert levels.speech_seconds(np.zeros(0, dtype=np.float32), -50.0) == 0.0


def test_has_speech_min_fraction():
    hop = np.zeros(8000, dtype=np.float32)  # 25 frames
    assert not levels.has_speech(hop, -50.0, 0.2)
    hop[: FRAME_SAMPLES * 5] = 0.1  # 5 of 25 frames = 0.2
    assert levels.has_speech(hop, -50.0, 0.2)
    hop[FRAME_SAMPLES * 4 : FRAME_SAMPLES * 5] = 0.0  # 4 of 25 frames
    assert not levels.has_speech(hop, -50.0, 0.2)


def test_has_speech_needs_at_least_one_frame():
    assert not levels.has_speech(np.zeros(0, dtype=np.float32), -50.0, 0.0)
    assert not levels.has_speech(np.zeros(8000, dtype=np.float32), -50.0, 0.0)
    assert levels.has_speech(np.full(320, 0.5, dtype=np.float32), -50.0, 0.0)


def test_has_speech_quiet_signal_below_gate():
    assert not levels.has_speech(sine(300, 0.5, 0.001), -50.0, 0.2)  # ~ -63 dBFS
    assert levels.has_speech(sine(300, 0.5, 0.01), -50.0, 0.2)  # ~ -43 dBFS


# ------------------------------------------------------------------ clipping
def test_clipping_fraction():
    assert levels.clipping_fraction(np.zeros(0, dtype=np.float32)) == 0.0
    assert levels.clipping_fraction(sine(440, 0.5, 0.5)) == 0.0
    x = np.zeros(1000, dtype=np.float32)
    x[:10] = 32767 / 32768
    x[10:20] = -1.0
    assert levels.clipping_fraction(x) == pytest.approx(0.02)
    x[:] = 32765 / 32768
    assert levels.clipping_fraction(x) == 0.0


# --------------------------------------------------------------- RecentFloor
def test_recent_floor_is_a_low_percentile_of_the_last_span_levels():
    f = levels.RecentFloor(span=10, least=3)
    f.extend([-60.0, -20.0])
    assert f.floor() is None  # fewer than `least` levels
    f.extend([-20.0] * 8)
    assert f.floor() == pytest.approx(np.percentile([-60.0] + [-20.0] * 9, 10))
    f.extend([-20.0])  # the -60 dB level leaves the span (the cached floor too)
    assert f.floor() == pytest.approx(-20.0)


@pytest.mark.parametrize("n", [1, 2, 7, 80])
def test_recent_floor_matches_numpys_percentile(n):
    rng = np.random.default_rng(n)
    xs = rng.uniform(-90, -10, n)
    f = levels.RecentFloor(span=80, least=1, percentile=10.0)
    f.extend(xs)
    assert f.floor() == pytest.approx(np.percentile(xs, 10.0))


def test_a_blocks_spectral_shape_leaves_its_level_out():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(16000) * 0.05).astype(np.float32)
    shapes = levels.block_shapes(x, 1600)
    shapes10 = levels.block_shapes(x * 0.1, 1600)  # 20 dB quieter
    assert shapes.shape == (10, levels.SHAPE_EDGES.size - 1)
    assert np.allclose(shapes, shapes10, atol=1e-3)
    assert np.allclose(shapes.mean(axis=1), 0.0, atol=1e-9)
    # white noise is flat per Hz: the wide top band holds the most energy
    assert shapes[:, -1].mean() > shapes[:, 0].mean() + 15
    assert levels.block_shapes(x[:1599], 1600).shape == (0, 16)


def _extend(m: levels.BackgroundMotion, x: np.ndarray) -> None:
    m.extend(x, 1600, levels.frame_dbfs(x, 1600))


def _motion(x: np.ndarray) -> float | None:
    m = levels.BackgroundMotion(span=400, least=10, within_db=1.0)
    for i in range(0, x.size, 8000):  # in hops, as a stream comes
        _extend(m, x[i : i + 8000])
    lv = levels.frame_dbfs(x, 1600)
    return m.spread_db(float(np.percentile(lv, 10)))


def test_steady_noise_does_not_move_a_changing_spectrum_does():
    """White noise, and a hum with its hiss, keep one spectrum (their
    spread is the estimate's own scatter); noise whose colour changes every
    0.3 s, as talk's does, moves."""
    rng = np.random.default_rng(2)
    n = 16000 * 10
    t = np.arange(n) / 16000
    steady = [
        rng.standard_normal(n) * 0.01,
        0.02 * np.sin(2 * np.pi * 100 * t) + rng.standard_normal(n) * 0.002,
    ]
    for x in steady:
        assert _motion(x.astype(np.float32)) < 2.8
    w = rng.standard_normal(n)
    low = np.convolve(w, np.ones(8) / 8, mode="same")  # a dull colour
    high = np.diff(w, prepend=0.0)  # a bright one
    which = (np.arange(n) // 4800) % 2 == 0
    changing = np.where(which, low / low.std(), high / high.std()) * 0.01
    assert _motion(changing.astype(np.float32)) > 2.8


def test_background_motion_is_unknown_without_a_floor_or_enough_blocks():
    m = levels.BackgroundMotion(span=400, least=10, within_db=1.0)
    x = (np.random.default_rng(3).standard_normal(16000) * 0.01).astype(np.float32)
    _extend(m, x[:8000])
    assert m.spread_db(None) is None
    assert m.spread_db(-40.0) is None  # 5 blocks: fewer than 10
    _extend(m, x[8000:])
    assert m.spread_db(-20.0) is not None  # all 10 under the floor + 1 dB
    assert m.spread_db(-90.0) is None  # none near so low a floor


def test_background_motion_forgets_blocks_older_than_its_span():
    m = levels.BackgroundMotion(span=10, least=10, within_db=1.0)
    rng = np.random.default_rng(4)
    _extend(m, (rng.standard_normal(16000) * 0.01).astype(np.float32))
    _extend(m, (rng.standard_normal(16000) * 1e-4).astype(np.float32))
    # only the quiet second second is left: all 10 blocks near -80 dBFS
    assert m.spread_db(-79.0) is not None
    assert m.spread_db(-81.5) is None
