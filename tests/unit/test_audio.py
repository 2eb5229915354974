"""Frame decoding, format checks, resampling and WAV decoding (diglett.engine.audio)."""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile as sf

from diglett.engine.audio import (
    encode_s16,
    AudioError,
    InputFormat,
    StreamResampler,
    check_format,
    decode_frame,
    decode_wav,
    resample,
)

S16 = InputFormat(16000, "pcm_s16le")
F32 = InputFormat(16000, "pcm_f32le")


s16_bytes = encode_s16


def f32_bytes(x: np.ndarray) -> bytes:
    return np.asarray(x, dtype="<f4").tobytes()


def tone(rate: int, seconds: float, freq: float = 440.0, amp: float = 0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@contextmanager
def raises_code(code: str):
    """Like pytest.raises(AudioError), also checking the protocol's code."""
    with pytest.raises(AudioError) as info:
        yield info
    assert info.value.code == code, str(info.value)


# ---------------------------------------------------------------- formats
def test_default_input_format():
    fmt = InputFormat()
    assert (fmt.sample_rate, fmt.encoding) == (16000, "pcm_s16le")
    assert fmt.bytes_per_sample == 2
    assert fmt.max_frame_bytes == 32000


def test_max_frame_bytes_is_one_second():
    assert InputFormat(48000, "pcm_f32le").max_frame_bytes == 48000 * 4
    assert InputFormat(44100, "pcm_s16le").max_frame_bytes == 44100 * 2


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
@pytest.mark.parametrize("encoding", ["pcm_s16le", "pcm_f32le"])
def test_check_format_accepts(rate, encoding):
    fmt = check_format(rate, encoding)
    assert fmt == InputFormat(rate, encoding)


@pytest.mark.parametrize("rate", [7999, 96001, 0, -16000, 10**12])
def test_check_format_rejects_rates(rate):
    with raises_code("unsupported_format"):
        check_format(rate, "pcm_s16le")


@pytest.mark.parametrize(
    "encoding", ["pcm_s24le", "pcm_s16be", "PCM_S16LE", "opus", "", "pcm_u8"]
)
def test_check_format_rejects_encodings(encoding):
    with raises_code("unsupported_format"):
        check_format(16000, encoding)


# ----------------------------------------------------------------- decode
def test_decode_s16_values():
    data = np.array([0, 1, -1, 16384, -32768, 32767], dtype="<i2").tobytes()
    x = decode_frame(data, S16)
    assert x.dtype == np.float32
    assert x.shape == (6,)
    np.testing.assert_allclose(
        x, [0, 1 / 32768, -1 / 32768, 0.5, -1.0, 32767 / 32768], rtol=0, atol=1e-9
    )


def test_decode_s16_is_little_endian():
    x = decode_frame(b"\x00\x01", S16)  # 0x0100 = 256
    assert x[0] == pytest.approx(256 / 32768)


def test_decode_s16_roundtrip():
    y = tone(16000, 0.25)
    x = decode_frame(s16_bytes(y), S16)
    np.testing.assert_allclose(x, y, atol=1 / 32768)


def test_decode_f32_values_and_clip():
    data = f32_bytes([0.0, 0.25, -0.5, 1.0, -1.0, 1.5, -7.0])
    x = decode_frame(data, F32)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [0.0, 0.25, -0.5, 1.0, -1.0, 1.0, -1.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decode_f32_non_finite_is_bad_audio(bad):
    data = f32_bytes([0.1, bad, 0.2])
    with raises_code("bad_audio"):
        decode_frame(data, F32)


@pytest.mark.parametrize("n", [1, 3, 31999])
def test_decode_s16_odd_byte_count_is_bad_audio(n):
    with raises_code("bad_audio"):
        decode_frame(b"\x00" * n, S16)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7])
def test_decode_f32_partial_sample_is_bad_audio(n):
    with raises_code("bad_audio"):
        decode_frame(b"\x00" * n, F32)


def test_decode_empty_frame_is_empty():
    for fmt in (S16, F32, InputFormat(48000, "pcm_f32le")):
        x = decode_frame(b"", fmt)
        assert x.shape == (0,)


@pytest.mark.parametrize(
    "fmt",
    [S16, F32, InputFormat(48000, "pcm_s16le"), InputFormat(8000, "pcm_f32le")],
)
def test_exactly_one_second_is_accepted(fmt):
    data = b"\x00" * fmt.max_frame_bytes
    assert decode_frame(data, fmt).shape == (fmt.sample_rate,)


@pytest.mark.parametrize(
    "fmt",
    [S16, F32, InputFormat(48000, "pcm_s16le"), InputFormat(8000, "pcm_f32le")],
)
def test_over_one_second_is_frame_too_large(fmt):
    data = b"\x00" * (fmt.max_frame_bytes + fmt.bytes_per_sample)
    with raises_code("frame_too_large"):
        decode_frame(data, fmt)


def test_oversized_odd_frame_is_frame_too_large():
    with raises_code("frame_too_large"):
        decode_frame(b"\x00" * 32001, S16)


# -------------------------------------------------------------- resampling
def test_stream_resampler_passthrough_at_16k():
    r = StreamResampler(16000)
    x = tone(16000, 0.1)
    np.testing.assert_array_equal(r.push(x), x)
    assert r.flush().shape == (0,)


def _stream(rate: int, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = StreamResampler(rate)
    outs, i = [], 0
    while i < x.size:
        k = int(rng.integers(1, rate // 2))
        outs.append(r.push(x[i : i + k]))
        i += k
    outs.append(r.flush())
    return np.concatenate(outs)


@pytest.mark.parametrize("rate", [48000, 44100, 22050, 8000, 96000])
def test_stream_resampler_sample_count_after_flush(rate):
    rng = np.random.default_rng(rate)
    for n in (rate, rate * 2 + 7, rate // 3):
        x = tone(rate, n / rate)
        y = _stream(rate, x, rng)
        expected = n * 16000 / rate
        assert abs(y.size - expected) <= 1, (rate, n, y.size, expected)
        assert y.dtype == np.float32


@pytest.mark.parametrize("rate", [48000, 44100])
def test_stream_resampler_matches_one_shot(rate):
    rng = np.random.default_rng(7)
    x = tone(rate, 2.0, 440) + tone(rate, 2.0, 1700, 0.2)
    y = _stream(rate, x, rng)
    z = resample(x, rate)
    n = min(y.size, z.size)
    assert abs(y.size - z.size) <= 1
    np.testing.assert_allclose(y[:n], z[:n], atol=1e-3)


@pytest.mark.parametrize("rate", [48000, 44100])
def test_resampled_tone_keeps_frequency_and_level(rate):
    x = tone(rate, 1.0, 1000, 0.5)
    y = resample(x, rate)
    assert abs(y.size - 16000) <= 1
    spec = np.abs(np.fft.rfft(y[1000:-1000]))
    freq = np.argmax(spec) * 16000 / (y.size - 2000)
    assert freq == pytest.approx(1000, abs=5)
    rms = np.sqrt(np.mean(y[1000:-1000] ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_stream_resampler_is_reusable_after_flush():
    rate = 48000
    rng = np.random.default_rng(1)
    x = tone(rate, 1.0)
    r = StreamResampler(rate)
    first = np.concatenate([r.push(x), r.flush()])
    second = np.concatenate([r.push(x), r.flush()])
    assert first.size == second.size == 16000
    np.testing.assert_allclose(first, second, atol=1e-6)
    assert _stream(rate, x, rng).size == 16000


def test_resample_at_16k_is_identity():
    x = tone(16000, 0.3)
    np.testing.assert_array_equal(resample(x, 16000), x)


# ---------------------------------------------------------------- decode_wav
def wav_bytes(x: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_decode_wav_mono_16k():
    x = tone(16000, 1.5)
    y, dur = decode_wav(wav_bytes(x, 16000), 60.0)
    assert dur == pytest.approx(1.5)
    assert y.shape == (24000,)
    np.testing.assert_allclose(y, x, atol=2 / 32768)


def test_decode_wav_stereo_44k_is_mixed_and_resampled():
    left = tone(44100, 2.0, 440, 0.4)
    right = tone(44100, 2.0, 440, 0.2)
    y, dur = decode_wav(wav_bytes(np.stack([left, right], axis=1), 44100), 60.0)
    assert dur == pytest.approx(2.0)
    assert abs(y.size - 32000) <= 1
    rms = np.sqrt(np.mean(y[1000:-1000] ** 2))
    assert rms == pytest.approx(0.3 / np.sqrt(2), rel=0.02)


def test_decode_wav_too_long():
    x = np.zeros(8000 * 3, dtype=np.float32)
    with raises_code("too_long"):
        decode_wav(wav_bytes(x, 8000), 2.0)
    y, dur = decode_wav(wav_bytes(x, 8000), 3.0)
    assert dur == pytest.approx(3.0)


@pytest.mark.parametrize(
    "data", [b"", b"not a wav file at all", b"RIFF\x00\x00\x00\x00WAVE", bytes(1000)]
)
def test_decode_wav_garbage_is_bad_audio(data):
    with raises_code("bad_audio"):
        decode_wav(data, 60.0)


def test_decode_wav_empty_is_bad_audio():
    with raises_code("bad_audio"):
        decode_wav(wav_bytes(np.zeros(0, dtype=np.float32), 16000), 60.0)


def test_decode_wav_nan_is_bad_audio():
    x = tone(16000, 0.1)
    x[5] = np.nan
    with raises_code("bad_audio"):
        decode_wav(wav_bytes(x, 16000, "FLOAT"), 60.0)


def test_decode_wav_float_is_clipped():
    x = np.full(1600, 2.0, dtype=np.float32)
    y, _ = decode_wav(wav_bytes(x, 16000, "FLOAT"), 60.0)
    assert y.max() <= 1.0
