"""Pure hold-back logic: which streams count as fast, and how long their
frames may wait (diglett/engine/holdback.py). The frame-by-frame equivalence with
the engine is in test_session_engine.py."""

from __future__ import annotations

import numpy as np
import pytest

from diglett.engine.audio import InputFormat
from diglett.engine.holdback import (
    COALESCE_S,
    FAST_LEAD_S,
    HoldRule,
    StreamPace,
    send_by,
)

S16 = InputFormat()
F32_48K = InputFormat(48000, "pcm_f32le")


def _frame(seconds: float, t: float, fmt: InputFormat = S16):
    n = int(seconds * fmt.sample_rate) * fmt.bytes_per_sample
    return (False, b"\0" * n, t)


def _paced(seconds_per_frame: float, speed: float, total_s: float, fmt=S16, t0=100.0):
    """Frames of `seconds_per_frame` arriving at `speed` x real time from `t0`."""
    n = int(total_s / seconds_per_frame)
    gap = seconds_per_frame / speed
    return [_frame(seconds_per_frame, t0 + i * gap, fmt) for i in range(n)]


@pytest.mark.parametrize("frame_s", [0.02, 0.1, 1.0])
@pytest.mark.parametrize("fmt", [S16, F32_48K])
def test_a_real_time_stream_is_never_fast(frame_s, fmt):
    pace = StreamPace()
    for f in _paced(frame_s, 1.0, 120.0, fmt):
        pace.add([f], fmt)
        assert pace.lead_s <= frame_s + 1e-6 and not pace.fast


def test_a_stream_at_50x_is_fast_within_a_few_frames():
    pace = StreamPace()
    frames = _paced(1.0, 50.0, 10.0)
    pace.add(frames[:2], S16)
    assert not pace.fast
    pace.add(frames[2:3], S16)
    assert pace.fast and pace.lead_s > FAST_LEAD_S


def test_up_to_twice_real_time_drains():
    pace = StreamPace()
    for f in _paced(0.1, 1.9, 60.0):
        pace.add([f], S16)
    assert not pace.fast


def test_catching_up_after_a_stall_is_fast_only_as_long_as_the_stall():
    """A real-time client stalls 5 s, then sends the 5 s it holds at once and
    goes on in real time: fast for a few seconds, then no longer."""
    pace = StreamPace()
    t = 0.0
    for _ in range(50):
        t += 0.1
        pace.add([_frame(0.1, t)], S16)
    t += 5.0
    pace.add([_frame(0.1, t) for _ in range(50)], S16)
    assert pace.fast
    for _ in range(40):  # 4 s later: it drains 1 s a second
        t += 0.1
        pace.add([_frame(0.1, t)], S16)
    assert not pace.fast


def test_a_control_message_starts_the_pace_afresh():
    """Enrollment clips go at once; the real-time stream after them is not fast."""
    pace = StreamPace()
    pace.add([_frame(0.5, 1.0) for _ in range(20)], S16)  # two 5 s clips
    assert pace.fast
    pace.add([(True, '{"type": "stream"}', 1.1)], S16)
    assert pace.lead_s == 0.0
    for f in _paced(0.1, 1.0, 10.0, t0=1.1):
        pace.add([f], S16)
        assert not pace.fast


def _fast() -> StreamPace:
    pace = StreamPace()
    pace.add(_paced(1.0, 50.0, 5.0), S16)
    assert pace.fast
    return pace


def test_send_by_the_oldest_frame_plus_one_hop():
    rule = HoldRule(wanted=16000, fmt=S16)
    held, new = [_frame(1.0, 7.0)], [_frame(1.0, 7.02)]
    assert send_by(held, new, rule, _fast()) == pytest.approx(7.0 + COALESCE_S)
    assert send_by([], new, rule, _fast()) == pytest.approx(7.02 + COALESCE_S)


def test_send_now_when_slow_idle_or_a_frame_deserves_an_answer():
    rule = HoldRule(wanted=16000, fmt=S16)
    ok = _frame(1.0, 7.0)
    assert send_by([ok], [ok], rule, StreamPace()) is None  # real time
    assert send_by([ok], [ok], HoldRule(), _fast()) is None  # takes no audio
    assert send_by([ok], [(True, '{"type": "end"}', 7.1)], rule, _fast()) is None
    assert send_by([ok], [(False, b"\0" * 3, 7.1)], rule, _fast()) is None
    big = _frame(1.5, 7.1)  # over 1 s: frame_too_large is answered now
    assert send_by([ok], [big], rule, _fast()) is None
    f32 = HoldRule(wanted=6400, fmt=InputFormat(16000, "pcm_f32le"))
    nan = (False, np.array([0.5, np.nan], "<f4").tobytes(), 7.1)
    assert send_by([], [nan], f32, _fast()) is None  # bad_audio too
    assert send_by([], [], rule, _fast()) is None
