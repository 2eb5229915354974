"""Property tests (hypothesis) of every parser and of the decision logic.

Whatever the input, a parser returns a valid value or raises its error type
with one of the protocol's codes; nothing else escapes. The session engine
answers any sequence of frames with protocol messages only, and a
recoverable error leaves its state as it was.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diglett.engine.audio import AudioError, InputFormat, check_format, decode_frame
from diglett.engine.audio import decode_wav
from diglett.engine.decision import NOISE, decide
from diglett.engine.protocol import (
    CLOSE_CODES,
    KNOWN_TYPES,
    ProtocolError,
    parse_control,
)
from diglett.engine.session import Close, EnrollJob, EnrollWindowJob, HopJob
from diglett.engine.session import SessionEngine, Summary
from diglett.settings import Settings

FAST = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
RECOVERABLE = {
    "bad_message",
    "bad_audio",
    "enroll_too_short",
    "too_many_speakers",
    "not_enrolled",
    "unsupported_format",
}
ALL_CODES = RECOVERABLE | set(CLOSE_CODES)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(KNOWN_TYPES + ("dance", "", "ENROLL"))},
    optional={
        "speaker": json_values,
        "sample_rate": json_values,
        "encoding": st.sampled_from(["pcm_s16le", "pcm_f32le", "mp3", ""])
        | json_values,
        "extra": json_values,
    },
)


def _check_parse(text: str) -> None:
    try:
        msg = parse_control(text)
    except ProtocolError as exc:
        assert exc.code == "bad_message" and exc.message
        return
    assert msg.type in KNOWN_TYPES


@FAST
@given(st.text(max_size=300))
def test_parse_control_any_text(text):
    _check_parse(text)


@FAST
@given(json_values)
def test_parse_control_any_json(value):
    _check_parse(json.dumps(value))


@FAST
@given(messages)
def test_parse_control_message_shapes(obj):
    _check_parse(json.dumps(obj))


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from("[{"))
def test_parse_control_deep_nesting(depth, opener):
    closer = "]" if opener == "[" else "}"
    body = (opener if opener == "[" else '{"a":') * depth
    _check_parse(body + "1" + closer * depth)


@FAST
@given(st.binary(max_size=200))
def test_parse_control_undecodable_bytes(data):
    _check_parse(data.decode("utf-8", errors="surrogateescape"))


@FAST
@given(
    st.one_of(st.integers(), st.integers(min_value=7000, max_value=100_000)),
    st.text(max_size=12) | st.sampled_from(["pcm_s16le", "pcm_f32le"]),
)
def test_check_format(rate, encoding):
    try:
        fmt = check_format(rate, encoding)
    except AudioError as exc:
        assert exc.code == "unsupported_format"
        return
    assert 8000 <= fmt.sample_rate <= 96000 and fmt.encoding == encoding


@FAST
@given(
    st.binary(max_size=5000),
    st.sampled_from([8000, 16000, 44100]),
    st.sampled_from(["pcm_s16le", "pcm_f32le"]),
)
def test_decode_frame(data, rate, encoding):
    fmt = InputFormat(rate, encoding)
    try:
        x = decode_frame(data, fmt)
    except AudioError as exc:
        assert exc.code in {"bad_audio", "frame_too_large"}
        return
    assert x.dtype == np.float32 and x.size == len(data) // fmt.bytes_per_sample
    assert np.all(np.isfinite(x)) and np.all(np.abs(x) <= 1.0)


def _wav(n: int, rate: int, channels: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    x = np.zeros((n, channels), dtype=np.float32)
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=0, max_value=4000),
    st.sampled_from([8000, 16000, 22050]),
    st.integers(min_value=1, max_value=3),
    st.sampled_from(["PCM_16", "FLOAT", "PCM_U8"]),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=6),
    st.integers(min_value=0, max_value=200),
)
def test_decode_wav_corrupted(n, rate, channels, subtype, flips, cut):
    """Valid WAVs with bytes flipped and tails cut: audio or AudioError."""
    data = bytearray(_wav(n, rate, channels, subtype))
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    data = bytes(data[: max(0, len(data) - cut)])
    try:
        x, duration = decode_wav(data, max_s=0.2)
    except AudioError as exc:
        assert exc.code in {"bad_audio", "too_long"}
        return
    assert x.ndim == 1 and x.size > 0 and np.all(np.isfinite(x))
    assert 0 < duration <= 0.2


@FAST
@given(st.binary(max_size=400))
def test_decode_wav_random_bytes(data):
    try:
        decode_wav(data, max_s=60)
    except AudioError as exc:
        assert exc.code in {"bad_audio", "too_long"}


names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)


@FAST
@given(
    st.dictionaries(names, st.floats(-1, 1), max_size=5),
    st.floats(-1, 1),
)
def test_decide(scores, threshold):
    label = decide(scores, threshold)
    if label == NOISE:
        assert not scores or max(scores.values()) < threshold
    else:
        assert scores[label] == max(scores.values()) >= threshold
    # The order speakers were enrolled in does not matter.
    assert decide(dict(reversed(list(scores.items()))), threshold) == label


# A session fed arbitrary frames: protocol messages only, state kept on error.
valid_texts = st.sampled_from(
    [
        json.dumps({"type": "enroll", "speaker": "alice"}),
        json.dumps({"type": "enroll", "speaker": "bob"}),
        json.dumps({"type": "enroll", "speaker": "carol"}),
        json.dumps({"type": "enroll_end"}),
        json.dumps({"type": "stream"}),
        json.dumps({"type": "format", "sample_rate": 8000}),
        json.dumps({"type": "format", "sample_rate": 16000, "encoding": "pcm_f32le"}),
    ]
)
frames = st.lists(
    st.one_of(
        valid_texts.map(lambda t: (True, t)),
        st.text(max_size=40).map(lambda t: (True, t)),
        messages.map(lambda m: (True, json.dumps(m))),
        st.binary(max_size=600).map(lambda b: (False, b)),
        st.integers(1, 12).map(lambda k: (False, b"\x10\x20" * 1000 * k)),
    ),
    max_size=40,
)


@pytest.mark.parametrize("vad", ["energy", "silero"])
@settings(max_examples=200, deadline=None)
@given(seq=frames)
def test_session_engine_any_frames(vad, seq):
    # The level gate at -120 dBFS makes every hop speech (every hop is then
    # embedded); Silero VAD finds none in these frames, but its streaming
    # state sees every shape of input.
    s = Settings(
        enroll_min_s=0.1,
        enroll_min_speech_s=0.0,
        max_rate=0,
        gate_dbfs=-120.0,
        vad=vad,
    )
    eng = SessionEngine(s)
    t = 0.0
    next_seq = 0
    for is_text, payload in seq:
        t += 0.05
        before = (eng.state, sorted(eng.enrollments), eng.fmt)
        acts = eng.on_text(payload, t) if is_text else eng.on_binary(payload, t)
        msgs, close = eng.run(
            acts, lambda jobs: [np.ones(192, dtype=np.float32) for _ in jobs]
        )
        for a in acts:
            kinds = (dict, Close, HopJob, EnrollWindowJob, EnrollJob)
            assert isinstance(a, kinds + (Summary,))
        errors = [m for m in msgs if m["type"] == "error"]
        for m in errors:
            assert m["code"] in ALL_CODES and m["message"]
        if close == 1000:
            assert msgs[-1]["type"] == "summary" and not errors
            break
        if close is not None:
            assert errors and CLOSE_CODES[errors[-1]["code"]] == close
            break
        # enroll_too_short answers enroll_end, which closes the enrollment.
        kept = RECOVERABLE - {"enroll_too_short"}
        if errors and errors[-1]["code"] in kept and len(msgs) == 1:
            assert (eng.state, sorted(eng.enrollments), eng.fmt) == before
        for m in msgs:
            if m["type"] == "label":
                if m["seq"] == 0:
                    next_seq = 0
                assert m["seq"] == next_seq
                next_seq += 1
                assert math.isfinite(m["level_dbfs"])
            if m["type"] == "stream":
                next_seq = 0
