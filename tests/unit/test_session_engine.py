"""The per-session protocol state machine (diglett.engine.session.SessionEngine).

A deterministic fake embedding stands in for the model: it maps the dominant
frequency of a window to a fixed unit vector, so synthetic "voices" (tones of
different pitch) are different speakers. No model, no Ray: milliseconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from diglett.engine import levels
from diglett.engine.audio import encode_s16
from diglett.engine.session import (
    Close,
    EnrollJob,
    EnrollWindowJob,
    HopJob,
    LastPartJob,
    SessionEngine,
)
from diglett.engine.session import continues, enrollment_windows
from diglett.settings import Settings

SR = 16000
ALICE, BOB, CAROL, BETWEEN = 300.0, 1200.0, 2500.0, 700.0
_E = np.eye(5, dtype=np.float32)
VOICES = {
    ALICE: _E[0],
    BOB: _E[1],
    CAROL: _E[2],
    BETWEEN: 0.6 * _E[0] + 0.8 * _E[1],  # cos 0.6 to alice, 0.8 to bob
}

WINDOW_BUG = (
    "BUG: HopWindower trims its buffer too early, so the final partial hop's "
    "window is shorter than min(window, end) (see tests/unit/test_windowing.py)"
)
REATTACH_BUG = (
    "BUG: SessionEngine.reattach keeps audio_flowed and the old input format, so "
    "on a resumed connection `format` before its first binary frame is answered "
    "bad_message and audio is decoded at the previous connection's rate although "
    "`ready` announced 16000 Hz pcm_s16le"
)


def ToneSettings(**kw) -> Settings:
    """Settings for tone "voices": the level gate stands in for Silero VAD
    (a tone is no speech to a VAD; tests/unit/test_speech.py covers it on real
    speech), with the gate's share and the bars these tests were made for."""
    base = dict(vad="energy", speech_min_frac=0.4, rel_threshold=0.35)
    return Settings(**{**base, **kw})


def fake_embed(x: np.ndarray) -> np.ndarray:
    """A unit vector chosen by the window's dominant frequency."""
    x = np.asarray(x, dtype=np.float64)
    assert x.ndim == 1 and x.size > 0
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freq = np.argmax(spec) * SR / x.size
    for f, v in VOICES.items():
        if abs(freq - f) <= max(40.0, 0.06 * f):
            return v.copy() * 3.7  # not unit length: the engine normalizes
    return _E[4].copy()


def tone(freq: float, seconds: float, rate: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def bursts(
    freq: float,
    seconds: float,
    rate: int = SR,
    amp: float = 0.3,
    on: float = 0.48,
    off: float = 0.32,
    square: bool = False,
) -> np.ndarray:
    """Speech-like audio: `on` s of tone, `off` s of silence, repeated.

    The defaults are whole 20 ms gate frames, so the gate's speech count is exact.
    """
    x = tone(freq, seconds, rate, amp)
    if square:
        x = np.where(x >= 0, amp, -amp).astype(np.float32)
    period = int(round((on + off) * rate))
    gaps = (np.arange(x.size) % period) >= int(round(on * rate))
    x[gaps] = 0.0
    return x


def silence(seconds: float, rate: int = SR) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


class Client:
    """Drives a SessionEngine like the SessionActor does, on a fake clock."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.engine = SessionEngine(settings or ToneSettings())
        self.t = 1000.0
        self.rate, self.encoding = SR, "pcm_s16le"
        self.jobs: list = []
        self.embedded: list = []  # every job embedded, second looks too
        self.log: list = []

    def run(self, actions) -> list:
        """Embed the actions' jobs and resolve them in order, as the actor does.

        Returns the messages, then `Close(code)` when the engine closes.
        """
        self.jobs += [
            a for a in actions if isinstance(a, (HopJob, EnrollWindowJob, EnrollJob))
        ]
        msgs, close = self.engine.run(actions, self.embed)
        for m in msgs:
            assert isinstance(m, dict)
            json.dumps(m)  # every message must be sendable as JSON
        out = msgs + ([Close(close)] if close is not None else [])
        self.log.extend(out)
        return out

    def embed(self, jobs) -> list[np.ndarray]:
        assert all(j.audio is not None for j in jobs)
        self.embedded += jobs
        return [fake_embed(j.audio) for j in jobs]

    def send(self, msg) -> list:
        text = msg if isinstance(msg, str) else json.dumps(msg)
        out = self.run(self.engine.on_text(text, self.t))
        if isinstance(msg, dict) and msg.get("type") == "format":
            if out and out[0].get("type") == "format_ok":
                self.rate, self.encoding = out[0]["sample_rate"], out[0]["encoding"]
        return out

    def encode(self, x: np.ndarray) -> bytes:
        if self.encoding == "pcm_f32le":
            return np.asarray(x, dtype="<f4").tobytes()
        return encode_s16(x)

    def frame(self, data: bytes, dt: float | None = None) -> list:
        bps = 4 if self.encoding == "pcm_f32le" else 2
        self.t += (len(data) / bps / self.rate) if dt is None else dt
        return self.run(self.engine.on_binary(data, self.t))

    def audio(self, x: np.ndarray, chunk_s: float = 0.1) -> list:
        """Send `x` (float, at the client's rate) in frames of `chunk_s`."""
        n = max(1, int(round(chunk_s * self.rate)))
        out = []
        for i in range(0, x.size, n):
            out += self.frame(self.encode(x[i : i + n]))
        return out

    def enroll(self, name: str, x: np.ndarray, chunk_s: float = 0.25) -> list:
        assert self.send({"type": "enroll", "speaker": name}) == []
        assert self.audio(x, chunk_s) == []
        return self.send({"type": "enroll_end"})

    def enroll_ok(self, name: str, freq: float, seconds: float = 4.0) -> dict:
        [msg] = self.enroll(name, bursts(freq, seconds, self.rate))
        assert msg["type"] == "enrolled" and msg["speaker"] == name, msg
        return msg


def labels(msgs) -> list[dict]:
    return [m for m in msgs if isinstance(m, dict) and m.get("type") == "label"]


def errors(msgs) -> list[str]:
    return [m["code"] for m in msgs if isinstance(m, dict) and m.get("type") == "error"]


def assert_error(msgs, code: str) -> None:
    assert len(msgs) == 1, msgs
    m = msgs[0]
    assert m["type"] == "error" and m["code"] == code, m
    assert isinstance(m["message"], str) and m["message"]


def assert_tiles(labs, total_s: float | None = None, hop_s: float = 0.5) -> None:
    assert [m["seq"] for m in labs] == list(range(len(labs)))
    assert labs[0]["start_s"] == 0.0
    for a, b in zip(labs, labs[1:]):
        assert b["start_s"] == a["end_s"]
    for m in labs[:-1]:
        assert m["end_s"] - m["start_s"] == pytest.approx(hop_s, abs=1e-9)
    assert 0 < labs[-1]["end_s"] - labs[-1]["start_s"] <= hop_s + 1e-9
    if total_s is not None:
        assert labs[-1]["end_s"] == pytest.approx(total_s, abs=1.5 / SR)


def stream_to_end(c: Client, x: np.ndarray) -> list[dict]:
    """Stream `x` into `c`'s open stream and `end`; the labels, checked to
    tile the audio and to match the summary."""
    c.audio(x)
    c.send({"type": "end"})
    labs = labels(c.log)
    assert_tiles(labs, total_s=x.size / SR)
    assert_summary_matches(summary_of(c.log), labs)
    return labs


@pytest.fixture
def two() -> Client:
    """A client with alice and bob enrolled."""
    c = Client()
    c.enroll_ok("alice", ALICE)
    c.enroll_ok("bob", BOB)
    return c


# ============================================================== fake model
def test_fake_embedding_tells_voices_apart():
    for f, v in VOICES.items():
        for n in (500, 8000, 24000):
            got = fake_embed(tone(f, n / SR))
            np.testing.assert_allclose(got / np.linalg.norm(got), v / np.linalg.norm(v))


# ============================================================== enrollment
def test_enroll_flow_and_enrolled_fields():
    c = Client()
    x = bursts(ALICE, 5.0)
    assert c.send({"type": "enroll", "speaker": "alice"}) == []
    assert c.audio(x, 0.2) == []
    [msg] = c.send({"type": "enroll_end"})
    assert set(msg) == {
        "type",
        "speaker",
        "duration_s",
        "speech_s",
        "level_dbfs",
        "warnings",
    }
    assert msg["type"] == "enrolled" and msg["speaker"] == "alice"
    assert msg["duration_s"] == 5.0
    assert msg["speech_s"] == pytest.approx(levels.speech_seconds(x, -50.0), abs=1e-3)
    assert msg["speech_s"] == pytest.approx(6 * 0.48 + 0.2, abs=0.021)
    assert msg["level_dbfs"] == pytest.approx(levels.rms_dbfs(x), abs=0.06)
    assert msg["warnings"] == []
    assert list(c.engine.enrollments) == ["alice"]


def test_enroll_at_48k_float():
    c = Client()
    assert c.send(
        {"type": "format", "sample_rate": 48000, "encoding": "pcm_f32le"}
    ) == [{"type": "format_ok", "sample_rate": 48000, "encoding": "pcm_f32le"}]
    [msg] = c.enroll("alice", bursts(ALICE, 4.0, 48000), chunk_s=0.37)
    assert msg["type"] == "enrolled"
    assert msg["duration_s"] == pytest.approx(4.0, abs=2 / SR)
    assert msg["warnings"] == []
    [job] = [j for j in c.jobs if isinstance(j, EnrollJob)]
    assert abs(job.audio.size - 4 * SR) <= 1


def test_enroll_too_short_audio():
    c = Client()
    msgs = c.enroll("alice", tone(ALICE, 2.9))
    assert_error(msgs, "enroll_too_short")
    assert c.engine.enrollments == {}
    assert_error(c.send({"type": "stream"}), "not_enrolled")


def test_enroll_with_no_audio_is_too_short():
    c = Client()
    assert c.send({"type": "enroll", "speaker": "alice"}) == []
    assert_error(c.send({"type": "enroll_end"}), "enroll_too_short")


def test_enroll_enough_audio_but_too_little_speech():
    c = Client()
    x = np.concatenate([tone(ALICE, 1.0), silence(3.0)])
    assert_error(c.enroll("alice", x), "enroll_too_short")
    # quiet background below the gate is not speech either
    x = np.concatenate([tone(ALICE, 1.0), tone(CAROL, 4.0, amp=0.001)])
    assert_error(c.enroll("alice", x), "enroll_too_short")
    assert c.engine.enrollments == {}


def test_enroll_minimum_boundaries_are_accepted():
    c = Client()
    # exactly enroll_min_s of audio with exactly enroll_min_speech_s of speech
    x = np.concatenate([tone(ALICE, 1.5), silence(1.5)])
    [msg] = c.enroll("alice", x)
    assert msg["type"] == "enrolled"
    assert msg["duration_s"] == 3.0 and msg["speech_s"] == 1.5
    x = np.concatenate([tone(BOB, 1.5), silence(1.5 - 1 / SR)])
    assert_error(c.enroll("bob", x), "enroll_too_short")
    x = np.concatenate([tone(BOB, 1.48), silence(1.52)])
    assert_error(c.enroll("bob", x), "enroll_too_short")


def test_enroll_truncated_past_enroll_max_s():
    c = Client()
    x = bursts(ALICE, 31.0)
    [msg] = c.enroll("alice", x, chunk_s=1.0)
    assert msg["type"] == "enrolled"
    assert msg["duration_s"] == 30.0
    assert "truncated" in msg["warnings"]
    [job] = [j for j in c.jobs if isinstance(j, EnrollJob)]
    np.testing.assert_allclose(job.audio, x[: 30 * SR], atol=1 / 32768)


def test_enroll_exactly_enroll_max_s_is_not_truncated():
    c = Client()
    [msg] = c.enroll("alice", bursts(ALICE, 30.0), chunk_s=1.0)
    assert msg["duration_s"] == 30.0
    assert "truncated" not in msg["warnings"]


def test_enroll_truncated_at_48k():
    c = Client()
    c.send({"type": "format", "sample_rate": 48000})
    [msg] = c.enroll("alice", bursts(ALICE, 30.5, 48000), chunk_s=1.0)
    assert msg["duration_s"] == 30.0
    assert "truncated" in msg["warnings"]


def test_enroll_quiet_warning():
    c = Client()
    [msg] = c.enroll("alice", bursts(ALICE, 4.0, amp=0.01))  # about -43 dBFS
    assert msg["type"] == "enrolled"
    assert "quiet" in msg["warnings"]
    assert "clipping" not in msg["warnings"]
    assert msg["level_dbfs"] < -35


def test_enroll_clipping_warning():
    c = Client()
    [msg] = c.enroll("alice", bursts(ALICE, 4.0, amp=1.0, square=True))
    assert msg["type"] == "enrolled"
    assert "clipping" in msg["warnings"]
    assert "quiet" not in msg["warnings"]


def test_enroll_noisy_warning_for_constant_level():
    c = Client()
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(4 * SR)).astype(np.float32)
    [msg] = c.enroll("alice", x)
    assert msg["type"] == "enrolled"
    assert "noisy" in msg["warnings"]


def test_enroll_warnings_are_known_values():
    c = Client()
    for amp in (0.01, 0.3, 1.0):
        [msg] = c.enroll("alice", bursts(ALICE, 31.0, amp=amp), chunk_s=1.0)
        assert set(msg["warnings"]) <= {"truncated", "quiet", "clipping", "noisy"}
        assert len(set(msg["warnings"])) == len(msg["warnings"])


def test_replace_existing_speaker():
    c = Client()
    c.enroll_ok("alice", ALICE)
    c.enroll_ok("alice", BOB)  # same name, new voice: replaces
    assert list(c.engine.enrollments) == ["alice"]
    c.send({"type": "stream"})
    labs = labels(c.audio(tone(BOB, 1.0)))
    assert [m["label"] for m in labs] == ["alice", "alice"]
    assert labs[0]["scores"] == {"alice": pytest.approx(1.0, abs=1e-3)}
    c.send({"type": "end"})
    # the replacement does not use up a slot
    c2 = Client()
    c2.enroll_ok("alice", ALICE)
    c2.enroll_ok("alice", BOB)
    c2.enroll_ok("bob", CAROL)


def test_failed_replacement_keeps_old_enrollment():
    c = Client()
    c.enroll_ok("alice", ALICE)
    old = c.engine.enrollments["alice"].copy()
    assert_error(c.enroll("alice", tone(BOB, 1.0)), "enroll_too_short")
    np.testing.assert_array_equal(c.engine.enrollments["alice"], old)
    c.send({"type": "stream"})
    labs = labels(c.audio(tone(ALICE, 0.5)))
    assert [m["label"] for m in labs] == ["alice"]


def test_too_many_speakers_in_reply_to_enroll(two):
    msgs = two.send({"type": "enroll", "speaker": "carol"})
    assert_error(msgs, "too_many_speakers")
    # nothing changed: not enrolling, so audio is stray and enroll_end is out of order
    assert_error(two.frame(two.encode(tone(CAROL, 0.1))), "bad_message")
    assert_error(two.send({"type": "enroll_end"}), "bad_message")
    assert sorted(two.engine.enrollments) == ["alice", "bob"]
    # an existing name may still be re-enrolled at the limit
    two.enroll_ok("bob", CAROL)
    assert sorted(two.engine.enrollments) == ["alice", "bob"]


def test_max_speakers_setting():
    c = Client(ToneSettings(max_speakers=3))
    for name, f in [("a", ALICE), ("b", BOB), ("c", CAROL)]:
        c.enroll_ok(name, f)
    assert_error(c.send({"type": "enroll", "speaker": "d"}), "too_many_speakers")


def test_too_many_speakers_during_stream_keeps_streaming(two):
    two.send({"type": "stream"})
    labs = labels(two.audio(tone(ALICE, 0.7)))
    assert_error(two.send({"type": "enroll", "speaker": "carol"}), "too_many_speakers")
    labs += labels(two.audio(tone(ALICE, 0.8)))
    assert_tiles(labs)
    assert [m["seq"] for m in labs] == [0, 1, 2]
    assert labs[-1]["end_s"] == 1.5


# ================================================================ ordering
def test_enroll_end_without_enroll():
    c = Client()
    assert_error(c.send({"type": "enroll_end"}), "bad_message")
    c.enroll_ok("alice", ALICE)
    assert_error(c.send({"type": "enroll_end"}), "bad_message")
    assert list(c.engine.enrollments) == ["alice"]


def test_stream_while_enrolling_is_bad_message_and_enrollment_goes_on():
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    c.audio(bursts(ALICE, 2.0))
    assert_error(c.send({"type": "stream"}), "bad_message")
    assert c.audio(bursts(ALICE, 2.0)) == []
    [msg] = c.send({"type": "enroll_end"})
    assert msg["type"] == "enrolled" and msg["duration_s"] == 4.0


def test_enroll_while_enrolling_is_bad_message():
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    c.audio(bursts(ALICE, 2.0))
    assert_error(c.send({"type": "enroll", "speaker": "bob"}), "bad_message")
    c.audio(bursts(ALICE, 2.0))
    [msg] = c.send({"type": "enroll_end"})
    assert msg["speaker"] == "alice" and msg["duration_s"] == 4.0


def test_not_enrolled_on_stream():
    c = Client()
    assert_error(c.send({"type": "stream"}), "not_enrolled")
    # still idle: audio is stray
    assert_error(c.frame(c.encode(tone(ALICE, 0.1))), "bad_message")


def test_format_ok_echoes_values():
    c = Client()
    assert c.send(
        {"type": "format", "sample_rate": 44100, "encoding": "pcm_s16le"}
    ) == [{"type": "format_ok", "sample_rate": 44100, "encoding": "pcm_s16le"}]
    assert c.send({"type": "format", "sample_rate": 8000, "future": 1}) == [
        {"type": "format_ok", "sample_rate": 8000, "encoding": "pcm_s16le"}
    ]


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "format", "sample_rate": 7999},
        {"type": "format", "sample_rate": 96001},
        {"type": "format", "sample_rate": 48000, "encoding": "pcm_s24le"},
        {"type": "format", "sample_rate": 48000, "encoding": "opus"},
    ],
)
def test_unsupported_format_keeps_previous_format(msg):
    c = Client()
    c.send({"type": "format", "sample_rate": 48000, "encoding": "pcm_f32le"})
    assert_error(c.send(msg), "unsupported_format")
    assert (c.engine.fmt.sample_rate, c.engine.fmt.encoding) == (48000, "pcm_f32le")
    c.enroll_ok("alice", ALICE)


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "format", "sample_rate": "48000"},
        {"type": "format", "sample_rate": 48000.5},
    ],
)
def test_badly_typed_format_is_bad_message(msg):
    c = Client()
    assert_error(c.send(msg), "bad_message")
    assert c.engine.fmt.sample_rate == SR


def test_format_after_audio_is_bad_message_and_changes_nothing():
    c = Client()
    c.enroll_ok("alice", ALICE)
    assert_error(
        c.send({"type": "format", "sample_rate": 48000, "encoding": "pcm_f32le"}),
        "bad_message",
    )
    assert (c.engine.fmt.sample_rate, c.engine.fmt.encoding) == (SR, "pcm_s16le")
    c.send({"type": "stream"})
    c.audio(tone(ALICE, 1.0))
    c.send({"type": "end"})
    assert labels(c.log)[-1]["end_s"] == 1.0  # still decoded as 16 kHz


def test_format_before_audio_during_enroll_is_accepted():
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    assert c.send({"type": "format", "sample_rate": 48000})[0]["type"] == "format_ok"
    c.audio(bursts(ALICE, 4.0, 48000))
    [msg] = c.send({"type": "enroll_end"})
    assert msg["duration_s"] == pytest.approx(4.0, abs=2 / SR)


def test_stray_binary_answered_once_per_control_message():
    c = Client()
    data = c.encode(tone(ALICE, 0.1))
    assert_error(c.frame(data), "bad_message")
    assert c.frame(data) == []
    assert c.frame(data) == []
    assert_error(c.send({"type": "enroll_end"}), "bad_message")  # a control message
    assert_error(c.frame(data), "bad_message")
    assert c.frame(data) == []
    assert c.send({"type": "format", "sample_rate": 16000})[0]["type"] == "format_ok"
    assert_error(c.frame(data), "bad_message")
    assert c.frame(data) == []
    assert_error(c.send("not json"), "bad_message")
    assert_error(c.frame(data), "bad_message")
    assert c.frame(b"") == []


def test_stray_frames_do_not_count_as_audio():
    c = Client()
    c.frame(c.encode(tone(ALICE, 0.1)))
    assert c.engine.enrollments == {}
    assert c.send({"type": "format", "sample_rate": 48000})[0]["type"] == "format_ok"


def test_audio_after_enroll_end_is_not_labelled():
    c = Client()
    c.enroll_ok("alice", ALICE)
    data = c.encode(tone(ALICE, 0.5))
    assert_error(c.frame(data), "bad_message")
    assert c.frame(data) == []
    assert labels(c.log) == []


def test_stray_binary_after_stream_ends():
    c = Client()
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    c.audio(tone(ALICE, 0.5))
    c.send({"type": "enroll", "speaker": "bob"})
    c.audio(bursts(BOB, 4.0))
    c.send({"type": "enroll_end"})
    before = len(labels(c.log))
    assert_error(c.frame(c.encode(tone(ALICE, 0.5))), "bad_message")
    assert len(labels(c.log)) == before


# =============================================================== streaming
def test_labels_tile_the_stream_at_16k(two):
    assert two.send({"type": "stream"}) == []
    msgs = two.audio(tone(ALICE, 2.3), chunk_s=0.1)
    labs = labels(msgs)
    assert len(labs) == 4 and len(msgs) == 4
    out = two.send({"type": "end"})
    labs += labels(out)
    assert len(labs) == 5
    assert_tiles(labs, total_s=2.3)
    assert labs[-1]["start_s"] == 2.0 and labs[-1]["end_s"] == 2.3
    for m in labs:
        assert m["label"] == "alice"
        assert set(m["scores"]) == {"alice", "bob"}
        assert m["scores"]["alice"] == pytest.approx(1.0, abs=1e-3)
        assert m["scores"]["bob"] == pytest.approx(0.0, abs=1e-3)
        assert m["level_dbfs"] == pytest.approx(20 * np.log10(0.3) - 3.01, abs=0.2)
        assert {"type", "seq", "start_s", "end_s", "label", "scores", "level_dbfs"} <= (
            set(m)
        )


def test_label_comes_with_the_hops_last_sample(two):
    two.send({"type": "stream"})
    x = tone(ALICE, 1.0)
    assert two.frame(two.encode(x[:7999])) == []
    [lab] = two.frame(two.encode(x[7999:8000]))
    assert (lab["seq"], lab["start_s"], lab["end_s"]) == (0, 0.0, 0.5)
    assert two.frame(two.encode(x[8000:15999])) == []
    [lab] = two.frame(two.encode(x[15999:]))
    assert lab["seq"] == 1


def test_many_hops_in_one_frame(two):
    two.send({"type": "stream"})
    labs = labels(two.frame(two.encode(tone(ALICE, 1.0))))
    assert [m["seq"] for m in labs] == [0, 1]


def test_hop_recv_t_is_time_of_its_last_sample(two):
    two.send({"type": "stream"})
    x = tone(ALICE, 1.0)
    t0 = two.t
    two.frame(two.encode(x[:5000]), dt=0.1)
    two.frame(two.encode(x[5000:9000]), dt=0.1)
    [job] = [j for j in two.jobs if isinstance(j, HopJob)]
    assert job.recv_t == pytest.approx(t0 + 0.2)


@pytest.mark.parametrize(
    "rate,encoding,chunk_s",
    [
        (48000, "pcm_s16le", 0.37),
        (48000, "pcm_f32le", 0.02),
        (44100, "pcm_s16le", 0.25),
        (8000, "pcm_f32le", 0.5),
        (96000, "pcm_s16le", 1.0),
    ],
)
def test_hops_are_counted_on_the_16k_timeline(rate, encoding, chunk_s):
    c = Client()
    c.send({"type": "format", "sample_rate": rate, "encoding": encoding})
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    x = tone(ALICE, 3.3, rate)
    c.audio(x, chunk_s)
    c.send({"type": "end"})
    labs = labels(c.log)
    assert_tiles(labs, total_s=x.size / rate)
    hops = [j for j in c.jobs if isinstance(j, HopJob)]
    assert len(hops) == len(labs) == 7
    for h in hops[:-1]:
        assert round((h.end_s - h.start_s) * SR) == 8000
        assert h.window.size == min(24000, round(h.end_s * SR))
    assert all(m["label"] == "alice" for m in labs)


def test_final_hop_window_is_full_length(two):
    two.send({"type": "stream"})
    two.audio(tone(ALICE, 2.3))
    two.send({"type": "end"})
    last = [j for j in two.jobs if isinstance(j, HopJob)][-1]
    assert (last.start_s, last.end_s) == (2.0, 2.3)
    assert last.window.size == 24000  # 1.5 s ending at 2.3 s


def test_final_shorter_hop_then_summary_then_close(two):
    two.send({"type": "stream"})
    two.audio(tone(BOB, 1.2))
    out = two.send({"type": "end"})
    assert [
        type(a).__name__ if not isinstance(a, dict) else a["type"] for a in out
    ] == [
        "label",
        "summary",
        "Close",
    ]
    assert out[0]["seq"] == 2 and out[0]["start_s"] == 1.0 and out[0]["end_s"] == 1.2
    assert out[0]["label"] == "bob"
    assert out[-1] == Close(1000)


def test_end_on_hop_boundary_has_no_extra_hop(two):
    two.send({"type": "stream"})
    two.audio(tone(ALICE, 1.0))
    out = two.send({"type": "end"})
    assert labels(out) == []
    assert out[0]["type"] == "summary" and out[0]["labels"] == 2
    assert out[0]["audio_s"] == 1.0
    assert out[-1] == Close(1000)


def test_nothing_after_close(two):
    two.send({"type": "stream"})
    two.audio(tone(ALICE, 0.5))
    assert two.send({"type": "end"})[-1] == Close(1000)
    assert two.send({"type": "stream"}) == []
    assert two.send({"type": "end"}) == []
    assert two.send("garbage") == []
    assert two.frame(two.encode(tone(ALICE, 0.5))) == []
    assert two.frame(b"\x00") == []


def test_end_without_stream():
    c = Client()
    out = c.send({"type": "end"})
    assert out == [
        {
            "type": "summary",
            "labels": 0,
            "audio_s": 0.0,
            "talk_s": {"noise": 0.0, "silence": 0.0},
        },
        Close(1000),
    ]


def test_end_summary_lists_enrolled_speakers(two):
    out = two.send({"type": "end"})
    assert out[0]["talk_s"] == {"alice": 0.0, "bob": 0.0, "noise": 0.0, "silence": 0.0}


def test_stream_again_restarts_seq_and_clock(two):
    two.send({"type": "stream"})
    two.audio(tone(ALICE, 1.2))
    out = two.send({"type": "stream"})
    assert [m["type"] for m in out] == ["label"]  # final hop, no summary, no close
    assert (out[0]["seq"], out[0]["start_s"], out[0]["end_s"]) == (2, 1.0, 1.2)
    first = labels(two.log)
    assert_tiles(first, total_s=1.2)
    n = len(two.log)
    two.audio(tone(BOB, 1.1))
    two.send({"type": "end"})
    second = labels(two.log[n:])
    assert_tiles(second, total_s=1.1)
    assert [m["label"] for m in second] == ["bob"] * 3
    assert not any(isinstance(a, Close) for a in two.log[:n])


def test_stream_again_without_audio(two):
    assert two.send({"type": "stream"}) == []
    assert two.send({"type": "stream"}) == []
    labs = labels(two.audio(tone(ALICE, 0.5)))
    assert labs[0]["seq"] == 0 and labs[0]["start_s"] == 0.0


def test_enroll_during_stream_ends_the_stream():
    c = Client()
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    c.audio(tone(ALICE, 1.3))
    out = c.send({"type": "enroll", "speaker": "bob"})
    assert [m["type"] for m in out] == ["label"]
    assert (out[0]["seq"], out[0]["start_s"], out[0]["end_s"]) == (2, 1.0, 1.3)
    assert c.audio(bursts(BOB, 4.0)) == []  # enrollment audio: no labels
    [msg] = c.send({"type": "enroll_end"})
    assert msg["type"] == "enrolled" and msg["speaker"] == "bob"
    assert msg["duration_s"] == 4.0  # no stream audio leaked into it
    c.send({"type": "stream"})
    labs = labels(c.audio(tone(BOB, 1.0)))
    assert [(m["seq"], m["start_s"], m["label"]) for m in labs] == [
        (0, 0.0, "bob"),
        (1, 0.5, "bob"),
    ]
    assert not any(isinstance(a, Close) for a in c.log)
    assert not any(isinstance(a, dict) and a["type"] == "summary" for a in c.log)


def test_enroll_during_48k_stream_flushes_resampler():
    c = Client()
    c.send({"type": "format", "sample_rate": 48000})
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    c.audio(tone(ALICE, 1.3, 48000), chunk_s=0.3)
    c.send({"type": "enroll", "speaker": "bob"})
    assert_tiles(labels(c.log), total_s=1.3)
    c.audio(bursts(BOB, 4.0, 48000))
    [msg] = c.send({"type": "enroll_end"})
    assert msg["duration_s"] == pytest.approx(4.0, abs=2 / SR)


def test_silence_hops_have_no_scores(two):
    two.send({"type": "stream"})
    labs = labels(two.audio(silence(1.0)))
    labs += labels(two.audio(tone(CAROL, 0.5, amp=0.0005)))  # about -69 dBFS
    assert len(labs) == 3
    for m in labs:
        assert m["label"] == "silence"
        assert "scores" not in m
    assert labs[0]["level_dbfs"] == -120.0 and labs[1]["level_dbfs"] == -120.0
    assert labs[2]["level_dbfs"] == pytest.approx(-69.0, abs=0.5)
    hops = [j for j in two.jobs if isinstance(j, HopJob)]
    assert all(h.window is None for h in hops)


def test_speech_hop_after_silence_is_scored(two):
    two.send({"type": "stream"})
    labs = labels(two.audio(np.concatenate([silence(0.5), tone(ALICE, 0.5)])))
    assert [m["label"] for m in labs] == ["silence", "alice"]
    assert "scores" in labs[1]


def test_unknown_voice_is_noise(two):
    two.send({"type": "stream"})
    labs = labels(two.audio(tone(CAROL, 1.0)))
    assert [m["label"] for m in labs] == ["noise", "noise"]
    for m in labs:
        assert set(m["scores"]) == {"alice", "bob"}
        assert max(m["scores"].values()) < 0.3


def test_argmax_not_biased_to_first_enrolled(two):
    assert list(two.engine.enrollments) == ["alice", "bob"]
    two.send({"type": "stream"})
    labs = labels(two.audio(tone(BETWEEN, 1.0)))
    for m in labs:
        assert m["scores"]["alice"] == pytest.approx(0.6, abs=1e-3)
        assert m["scores"]["bob"] == pytest.approx(0.8, abs=1e-3)
        assert m["label"] == "bob"


def test_threshold_setting_turns_weak_match_into_noise():
    c = Client(ToneSettings(threshold=0.7, rel_threshold=0.0))
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    labs = labels(c.audio(tone(BETWEEN, 0.5)))
    assert labs[0]["scores"] == {"alice": pytest.approx(0.6, abs=1e-3)}
    assert labs[0]["label"] == "noise"


def test_rel_threshold_is_relative_to_the_self_score():
    # fake_embed gives every speech sub-window of alice the same vector:
    # self-score 1, so her bar is rel_threshold itself.
    c = Client(ToneSettings(threshold=0.9, rel_threshold=0.65))
    c.enroll_ok("alice", ALICE)
    assert c.engine.self_scores["alice"] == pytest.approx(1.0)
    assert c.engine.thresholds() == {"alice": pytest.approx(0.65)}
    c.send({"type": "stream"})
    labs = labels(c.audio(tone(BETWEEN, 0.5)))  # cosine 0.6 < 0.65
    assert labs[0]["label"] == "noise"
    c = Client(ToneSettings(threshold=0.9, rel_threshold=0.55))
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    assert labels(c.audio(tone(BETWEEN, 0.5)))[0]["label"] == "alice"


def test_enrollment_reference_is_the_centroid_of_speech_sub_windows():
    c = Client()
    x = bursts(ALICE, 5.0)
    [msg] = c.enroll("alice", x)
    assert msg["type"] == "enrolled"
    wins = [j for j in c.jobs if isinstance(j, EnrollWindowJob)]
    assert len(wins) == 8  # 1.5 s windows every 0.5 s of 5 s
    assert all(w.audio.size == 24000 and w.speaker == "alice" for w in wins)
    np.testing.assert_array_equal(wins[-1].audio, c.jobs[-1].audio[-24000:])
    np.testing.assert_allclose(c.engine.enrollments["alice"], _E[0], atol=1e-6)


def test_enrollment_with_one_speech_window_uses_the_whole_clip():
    c = Client(ToneSettings(threshold=0.3, speech_min_frac=0.8))
    x = np.concatenate([tone(ALICE, 1.5), silence(2.0)])  # one speech window
    [msg] = c.enroll("alice", x)
    assert msg["type"] == "enrolled"
    assert not [j for j in c.jobs if isinstance(j, EnrollWindowJob)]
    assert c.engine.self_scores["alice"] is None
    assert c.engine.thresholds() == {"alice": 0.3}


def test_enrollment_windows_are_capped_and_spread():
    s = ToneSettings()
    x = bursts(ALICE, 30.0)
    wins = enrollment_windows(x, s, max_windows=5)
    assert len(wins) == 5
    np.testing.assert_array_equal(wins[0], x[:24000])
    np.testing.assert_array_equal(wins[-1], x[-24000:])


def test_speakers_take_turns(two):
    two.send({"type": "stream"})
    labs = labels(two.audio(np.concatenate([tone(ALICE, 3.0), tone(BOB, 3.0)])))
    got = [m["label"] for m in labs]
    assert got[:2] == ["alice", "alice"]
    assert got[-2:] == ["bob", "bob"]
    assert set(got) == {"alice", "bob"}


def test_other_hop_settings():
    c = Client(ToneSettings(hop_s=0.25, window_s=1.0))
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    c.audio(tone(ALICE, 1.1))
    c.send({"type": "end"})
    labs = labels(c.log)
    assert_tiles(labs, total_s=1.1, hop_s=0.25)
    assert len(labs) == 5
    hops = [j for j in c.jobs if isinstance(j, HopJob)]
    assert [h.window.size for h in hops[:4]] == [4000, 8000, 12000, 16000]


# ================================================================= summary
def summary_of(msgs) -> dict:
    [s] = [m for m in msgs if isinstance(m, dict) and m.get("type") == "summary"]
    return s


def assert_summary_matches(summary: dict, labs: list[dict]) -> None:
    assert summary["labels"] == len(labs)
    assert summary["audio_s"] == pytest.approx(
        sum(m["end_s"] - m["start_s"] for m in labs), abs=1e-3
    )
    talk: dict[str, float] = {}
    for m in labs:
        talk[m["label"]] = talk.get(m["label"], 0.0) + m["end_s"] - m["start_s"]
    for name, secs in summary["talk_s"].items():
        assert secs == pytest.approx(talk.get(name, 0.0), abs=1e-3), name
    assert set(talk) <= set(summary["talk_s"])
    assert sum(summary["talk_s"].values()) == pytest.approx(
        summary["audio_s"], abs=1e-3
    )


def test_summary_covers_all_streams_on_hop_boundaries(two):
    two.send({"type": "stream"})
    # carol's window (1.5 s) holds only silence besides her: a clean noise hop
    two.audio(np.concatenate([tone(ALICE, 1.0), silence(1.5), tone(CAROL, 0.5)]))
    two.send({"type": "stream"})
    two.audio(tone(BOB, 1.5))
    out = two.send({"type": "end"})
    s = summary_of(out)
    assert_summary_matches(s, labels(two.log))
    assert s["labels"] == 9
    assert s["audio_s"] == 4.5
    assert s["talk_s"] == {"alice": 1.0, "bob": 1.5, "noise": 0.5, "silence": 1.5}
    assert out[-1] == Close(1000)


def test_summary_counts_hops_ended_by_stream_and_enroll(two):
    two.send({"type": "stream"})
    two.audio(tone(ALICE, 0.7))
    two.send({"type": "stream"})  # final hop 0.5-0.7 completed here
    two.audio(tone(BOB, 0.6))
    two.send({"type": "enroll", "speaker": "bob"})  # final hop 0.5-0.6
    two.audio(bursts(BOB, 4.0))
    two.send({"type": "enroll_end"})
    out = two.send({"type": "end"})
    s = summary_of(out)
    assert_summary_matches(s, labels(two.log))
    assert s["labels"] == 4 and s["audio_s"] == pytest.approx(1.3)


def test_summary_includes_final_hop_of_end(two):
    """Regression: the summary used to be built before the final hop completed."""
    two.send({"type": "stream"})
    two.audio(tone(ALICE, 1.2))
    out = two.send({"type": "end"})
    assert [m["type"] for m in out[:-1]] == ["label", "summary"]  # final 0.2 s hop
    s = summary_of(out)
    assert_summary_matches(s, labels(two.log))
    assert s["labels"] == 3 and s["audio_s"] == 1.2
    assert s["talk_s"] == {"alice": 1.2, "bob": 0.0, "noise": 0.0, "silence": 0.0}


def test_summary_includes_hops_of_the_same_batch(two):
    """The SessionActor resolves a whole batch of frames' actions at once."""
    e = two.engine
    actions = e.on_text(json.dumps({"type": "stream"}), two.t)
    actions += e.on_binary(two.encode(tone(ALICE, 1.0)), two.t + 1)
    actions += e.on_binary(two.encode(tone(BOB, 0.3)), two.t + 1.3)
    actions += e.on_text(json.dumps({"type": "end"}), two.t + 1.3)
    todo = e.jobs(actions)
    msgs, close = e.finish(actions, [fake_embed(j.audio) for j in todo])
    assert close == 1000
    assert [m["type"] for m in msgs] == ["label"] * 3 + ["summary"]
    assert_summary_matches(summary_of(msgs), labels(msgs))
    assert summary_of(msgs)["labels"] == 3


def test_jobs_lists_only_hops_with_speech(two):
    e = two.engine
    actions = e.on_text(json.dumps({"type": "stream"}), two.t)
    for i, x in enumerate([silence(0.5), tone(ALICE, 0.5), silence(0.5)]):
        actions += e.on_binary(two.encode(x), two.t + 0.5 * (i + 1))
    hops = [a for a in actions if isinstance(a, HopJob)]
    assert len(hops) == 3
    assert e.jobs(actions) == [hops[1]]
    msgs, close = e.finish(actions, [fake_embed(hops[1].audio)])
    assert close is None
    assert [m["label"] for m in msgs] == ["silence", "alice", "silence"]


# ================================================================== limits
def test_exactly_one_second_frame_is_accepted(two):
    two.send({"type": "stream"})
    labs = labels(two.frame(two.encode(tone(ALICE, 1.0))))
    assert len(labs) == 2


def test_frame_too_large_closes_1009(two):
    two.send({"type": "stream"})
    out = two.frame(two.encode(tone(ALICE, 1.0 + 1 / SR)))
    assert len(out) == 2
    assert out[0]["type"] == "error" and out[0]["code"] == "frame_too_large"
    assert out[1] == Close(1009)
    assert two.frame(two.encode(tone(ALICE, 0.1))) == []
    assert two.send({"type": "end"}) == []


def test_frame_too_large_at_48k_float_during_enroll():
    c = Client()
    c.send({"type": "format", "sample_rate": 48000, "encoding": "pcm_f32le"})
    c.send({"type": "enroll", "speaker": "alice"})
    assert c.frame(c.encode(tone(ALICE, 1.0, 48000))) == []
    out = c.frame(c.encode(tone(ALICE, 1.0 + 1 / 48000, 48000)))
    assert out[0]["code"] == "frame_too_large" and out[1] == Close(1009)
    assert c.send({"type": "enroll_end"}) == []


def flood(c: Client, data: bytes, dt: float, most: int) -> tuple[int, list]:
    """Send `data` every `dt` s until the engine closes; (frames sent, last reply)."""
    out: list = []
    for i in range(1, most + 1):
        out = c.frame(data, dt=dt)
        if any(isinstance(a, Close) for a in out):
            return i, out
    return most, out


def test_rate_exceeded_closes_1008():
    two = Client()
    two.enroll_ok("alice", ALICE)  # 4 s of real time since the first frame
    s = two.engine.s
    two.send({"type": "stream"})
    data = two.encode(tone(ALICE, 1.0))
    most = int(s.rate_burst_s + s.max_rate * 4.0) + 20
    sent, out = flood(two, data, 0.001, most)  # ~1000x real time
    assert errors(out) == ["rate_exceeded"]
    assert out[-1] == Close(1008)
    assert sent < most
    assert two.frame(data, dt=10.0) == []
    assert two.send({"type": "end"}) == []


def test_rate_exceeded_after_the_burst():
    settings = ToneSettings(max_rate=20.0, rate_burst_s=10.0)
    c = Client(settings)
    c.send({"type": "enroll", "speaker": "alice"})
    sent, out = flood(c, c.encode(tone(ALICE, 1.0)), 0.001, 100)
    assert sent == 11  # 10 s of burst, then 20x real time
    assert errors(out) == ["rate_exceeded"] and out[-1] == Close(1008)


def test_rate_exceeded_during_enrollment():
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    data = c.encode(tone(ALICE, 1.0))
    sent, out = flood(c, data, 0.0, int(c.engine.s.rate_burst_s) + 20)
    assert out[-1] == Close(1008)
    assert c.send({"type": "enroll_end"}) == []


def test_fast_but_allowed_rate_is_fine(two):
    two.send({"type": "stream"})
    data = two.encode(tone(ALICE, 1.0))
    for _ in range(60):  # 10x real time, under max_rate 20
        out = two.frame(data, dt=0.1)
        assert errors(out) == []
    assert len(labels(two.log)) == 120


def test_rate_limit_can_be_disabled():
    c = Client(ToneSettings(max_rate=0))
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    data = c.encode(tone(ALICE, 1.0))
    for _ in range(50):
        assert errors(c.frame(data, dt=0.0)) == []


def test_bad_audio_odd_bytes_is_dropped(two):
    two.send({"type": "stream"})
    labs = labels(two.audio(tone(ALICE, 0.3)))
    assert_error(two.frame(b"\x01\x02\x03"), "bad_audio")
    labs += labels(two.audio(tone(ALICE, 0.7)))
    assert_tiles(labs, total_s=1.0)
    assert not any(isinstance(a, Close) for a in two.log)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bad_audio_non_finite_floats(bad):
    c = Client()
    c.send({"type": "format", "sample_rate": 16000, "encoding": "pcm_f32le"})
    c.enroll_ok("alice", ALICE)
    c.send({"type": "stream"})
    x = tone(ALICE, 0.2)
    x[100] = bad
    assert_error(c.frame(c.encode(x)), "bad_audio")
    labs = labels(c.audio(tone(ALICE, 1.0)))
    assert_tiles(labs, total_s=1.0)


def test_bad_audio_during_enrollment_is_dropped():
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    c.audio(bursts(ALICE, 2.0))
    assert_error(c.frame(b"\x00" * 3), "bad_audio")
    c.audio(bursts(ALICE, 2.0))
    [msg] = c.send({"type": "enroll_end"})
    assert msg["duration_s"] == 4.0


def test_empty_frames_are_no_ops(two):
    two.send({"type": "stream"})
    assert two.frame(b"") == []
    labs = labels(two.audio(tone(ALICE, 0.3)))
    assert two.frame(b"") == []
    labs += labels(two.audio(tone(ALICE, 0.2)))
    assert two.frame(b"") == []
    assert_tiles(labs, total_s=0.5)
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    assert c.frame(b"") == []
    # an empty frame is not audio: format is still allowed
    assert c.send({"type": "format", "sample_rate": 48000})[0]["type"] == "format_ok"


# ============================================== state unchanged after errors
def test_rejected_messages_leave_the_stream_untouched(two):
    two.send({"type": "stream"})
    labs = labels(two.audio(tone(ALICE, 0.7)))
    for text, code in [
        ("not json", "bad_message"),
        ("[1, 2]", "bad_message"),
        ('{"type": "hello"}', "bad_message"),
        ('{"speaker": "x"}', "bad_message"),
        ('{"type": "enroll", "speaker": "noise"}', "bad_message"),
        ('{"type": "enroll", "speaker": "a/b"}', "bad_message"),
        ('{"type": "enroll", "speaker": 5}', "bad_message"),
        ('{"type": "enroll", "speaker": "carol"}', "too_many_speakers"),
        ('{"type": "enroll_end"}', "bad_message"),
        ('{"type": "format", "sample_rate": 48000}', "bad_message"),
        ("[" * 100000 + "]" * 100000, "bad_message"),
        ("[" * 20000 + "]" * 20000, "bad_message"),
    ]:
        assert_error(two.send(text), code)
        labs += labels(two.audio(tone(ALICE, 0.3)))
    two.send({"type": "end"})
    labs = labels(two.log)
    assert_tiles(labs, total_s=0.7 + 12 * 0.3)
    assert all(m["label"] == "alice" for m in labs)
    assert errors(two.log) == [
        "bad_message",
        "bad_message",
        "bad_message",
        "bad_message",
        "bad_message",
        "bad_message",
        "bad_message",
        "too_many_speakers",
        "bad_message",
        "bad_message",
        "bad_message",
        "bad_message",
    ]


def test_rejected_messages_leave_the_enrollment_untouched():
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    c.audio(bursts(ALICE, 1.0))
    for text in [
        "{",
        '{"type": "stream"}',
        '{"type": "enroll", "speaker": "bob"}',
        '{"type": "enroll", "speaker": ""}',
        '{"type": "format", "sample_rate": 48000}',
        '{"type": "nope"}',
    ]:
        assert_error(c.send(text), "bad_message")
        c.audio(bursts(ALICE, 1.0))
    [msg] = c.send({"type": "enroll_end"})
    assert msg["speaker"] == "alice" and msg["duration_s"] == 7.0


def test_idle_state_untouched_by_errors():
    c = Client()
    for text in ["{", '{"type": "enroll_end"}', '{"type": "stream"}', "null"]:
        assert len(errors(c.send(text))) == 1
    assert c.engine.state == "idle"
    c.enroll_ok("alice", ALICE)


# ================================================================== resume
def test_reattach_keeps_enrollments_and_resets_stats(two):
    two.send({"type": "stream"})
    two.audio(tone(ALICE, 1.0))
    two.engine.disconnect()
    two.engine.reattach()
    assert sorted(two.engine.enrollments) == ["alice", "bob"]
    two.send({"type": "stream"})
    labs = labels(two.audio(tone(BOB, 0.5)))
    assert (labs[0]["seq"], labs[0]["start_s"], labs[0]["label"]) == (0, 0.0, "bob")
    s = summary_of(two.send({"type": "end"}))
    assert s["labels"] == 1 and s["audio_s"] == 0.5


def test_disconnect_drops_open_enrollment():
    c = Client()
    c.send({"type": "enroll", "speaker": "alice"})
    c.audio(bursts(ALICE, 4.0))
    c.engine.disconnect()
    c.engine.reattach()
    assert c.engine.enrollments == {}
    assert_error(c.send({"type": "enroll_end"}), "bad_message")


def test_format_allowed_on_resumed_connection():
    c = Client()
    c.enroll_ok("alice", ALICE)  # audio flowed on the first connection
    c.engine.disconnect()
    c.engine.reattach()  # a new connection; `ready` said 16000 Hz pcm_s16le
    assert c.send({"type": "format", "sample_rate": 48000}) == [
        {"type": "format_ok", "sample_rate": 48000, "encoding": "pcm_s16le"}
    ]


# ============================================================== look-ahead
def ahead() -> Client:
    c = Client(ToneSettings(lookahead_hops=1))
    c.enroll_ok("alice", ALICE)
    c.enroll_ok("bob", BOB)
    return c


def test_lookahead_labels_each_hop_from_the_next_window():
    x = np.concatenate([tone(ALICE, 1.0), tone(BOB, 2.0)])
    got = {}
    for hops, c in ((0, Client()), (1, ahead())):
        if hops == 0:
            c.enroll_ok("alice", ALICE)
            c.enroll_ok("bob", BOB)
        c.send({"type": "stream"})
        got[hops] = [m["label"] for m in stream_to_end(c, x)]
    # hop 1.0-1.5 s: its own window (0-1.5 s) is mostly alice, the window
    # ending 0.5 s later (0.5-2.0 s) mostly bob, as is the hop itself
    assert got[0] == ["alice"] * 3 + ["bob"] * 3
    assert got[1] == ["alice"] * 2 + ["bob"] * 4


def test_lookahead_keeps_a_hop_from_the_talker_after_a_short_pause():
    """Alice stops at 1.0 s and bob answers 0.15 s later: the window
    ending at 1.5 s is cut to bob's run (and a little before it), so hop
    0.5-1.0 s keeps its own window, all alice."""
    x = np.concatenate([tone(ALICE, 1.0), silence(0.15), tone(BOB, 1.35)])
    c = ahead()
    c.send({"type": "stream"})
    labs = stream_to_end(c, x)
    assert [m["label"] for m in labs] == ["alice"] * 2 + ["bob"] * 3
    hops = [j for j in c.jobs if isinstance(j, HopJob)]
    assert np.allclose(hops[1].window, x[:SR], atol=1e-3)  # its own, 0-1.0 s
    assert hops[0].window.size == SR  # the window ending 0.5 s after it
    assert not continues(round(1.15 * SR), SR) and continues(0, SR)
    assert not continues(None, SR)


def test_lookahead_waits_for_its_audio_and_keeps_the_hops_recv_t():
    c = ahead()
    c.send({"type": "stream"})
    t0 = c.t
    assert labels(c.frame(c.encode(tone(ALICE, 0.5)), dt=0.5)) == []
    [lab] = labels(c.frame(c.encode(tone(ALICE, 0.5)), dt=0.5))
    assert lab["seq"] == 0 and lab["_recv_t"] == pytest.approx(t0 + 0.5)
    assert c.engine.hold_rule().wanted == 2 * SR // 2  # 0.5 s, 16-bit
    [lab] = labels(c.send({"type": "stream"}))  # ends the stream: hop 1 too
    assert lab["seq"] == 1 and lab["label"] == "alice"


def test_a_shorter_lookahead_labels_a_hop_a_quarter_second_later():
    c = Client(ToneSettings(lookahead_hops=0.5))
    c.enroll_ok("alice", ALICE)
    c.enroll_ok("bob", BOB)
    c.send({"type": "stream"})
    t0 = c.t
    assert labels(c.frame(c.encode(tone(ALICE, 0.5)), dt=0.5)) == []
    [lab] = labels(c.frame(c.encode(tone(ALICE, 0.25)), dt=0.25))
    assert lab["seq"] == 0 and lab["_recv_t"] == pytest.approx(t0 + 0.5)
    assert c.engine.hold_rule().wanted == 2 * SR // 2
    labs = labels(c.send({"type": "end"}))
    assert [(m["seq"], m["label"]) for m in labs] == [(1, "alice")]
    assert labs[0]["end_s"] == 0.75


def test_lookahead_silent_hops_need_no_window_unless_talk_resumes():
    c = ahead()
    c.send({"type": "stream"})
    c.audio(np.concatenate([tone(ALICE, 1.0), silence(1.0), tone(ALICE, 0.5)]))
    c.send({"type": "end"})
    labs = labels(c.log)
    assert [m["label"] for m in labs] == ["alice"] * 2 + ["silence"] * 2 + ["alice"]
    hops = [j for j in c.jobs if isinstance(j, HopJob)]
    assert [h.speech for h in hops] == [True, True, False, False, True]
    assert [h.fill for h in hops] == [False, False, False, True, False]
    assert [h.window is not None for h in hops] == [True, True, False, True, True]
    assert "scores" not in labs[2]


def lookahead_labels(x: np.ndarray) -> list[dict]:
    c = ahead()
    c.send({"type": "stream"})
    return stream_to_end(c, x)


def test_lookahead_fills_a_one_hop_pause_inside_a_turn():
    labs = lookahead_labels(
        np.concatenate([tone(ALICE, 1.0), silence(0.5), tone(ALICE, 1.0)])
    )
    assert [m["label"] for m in labs] == ["alice"] * 5
    assert labs[2]["scores"]["alice"] > labs[2]["scores"]["bob"]


def test_lookahead_keeps_silence_between_two_talkers_and_long_pauses():
    x = np.concatenate([tone(ALICE, 1.0), silence(0.5), tone(BOB, 1.0)])
    assert [m["label"] for m in lookahead_labels(x)] == [
        "alice",
        "alice",
        "silence",
        "bob",
        "bob",
    ]
    x = np.concatenate([tone(ALICE, 1.0), silence(1.0), tone(ALICE, 1.0)])
    assert [m["label"] for m in lookahead_labels(x)][2:4] == ["silence"] * 2


def test_lookahead_fill_does_not_adapt_the_reference():
    c = ahead()
    c.send({"type": "stream"})
    c.audio(np.concatenate([tone(ALICE, 1.0), silence(0.5)]))
    before = c.engine.adapted["alice"].count
    c.audio(tone(ALICE, 0.5))
    assert labels(c.log)[-1]["label"] == "alice"  # the pause, filled
    assert c.engine.adapted["alice"].count == before


def test_lookahead_fill_follows_the_sessions_others(monkeypatch):
    """A next window that only just reaches alice's bar but is closer to
    the session's others is not alice's: the pause before it stays silent."""
    near = 1800.0
    monkeypatch.setitem(VOICES, near, 0.4 * _E[0] + np.sqrt(0.84) * _E[3])
    x = np.concatenate([tone(ALICE, 1.0), silence(0.5), tone(near, 1.0)])

    def run(others: bool) -> list[str]:
        c = Client(ToneSettings(lookahead_hops=1))
        c.enroll_ok("alice", ALICE)
        c.send({"type": "stream"})
        if others:
            c.engine.others.add(_E[3])
        c.audio(x)
        c.send({"type": "end"})
        return [m["label"] for m in labels(c.log)]

    assert run(False)[:3] == ["alice"] * 3
    assert run(True)[:4] == ["alice", "alice", "silence", "noise"]


def test_lookahead_setting_is_validated_and_announced():
    assert ToneSettings(lookahead_hops=1).info()["lookahead_s"] == 0.5
    assert ToneSettings().info()["lookahead_s"] == 0.0
    with pytest.raises(ValueError, match="LOOKAHEAD"):
        Settings.from_env(env={"DIGLETT_LOOKAHEAD_HOPS": "2"})


# ============================================================= second look
def blend_embed(x: np.ndarray) -> np.ndarray:
    """Like `fake_embed`, but a window of several voices is their blend,
    weighted by each voice's share of the window's power: so a window into
    which a new talker has come scores lower for the old one."""
    x = np.asarray(x, dtype=np.float64)
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    share = {f: power[np.abs(freqs - f) <= 40.0].sum() for f in (ALICE, BOB, CAROL)}
    total = sum(share.values())
    if total <= 0:
        return _E[4].copy()
    return sum(share[f] / total * VOICES[f] for f in share)


class BlendClient(Client):
    def embed(self, jobs) -> list[np.ndarray]:
        self.embedded += jobs
        return [blend_embed(j.audio) for j in jobs]


def blend_client(**kw) -> BlendClient:
    c = BlendClient(ToneSettings(**kw))
    c.enroll_ok("alice", ALICE)
    c.enroll_ok("bob", BOB)
    c.send({"type": "stream"})
    return c


def test_second_look_labels_a_talker_who_takes_over_without_a_pause():
    """Hop 2 (1.0-1.5 s) is bob's, but its window (0-1.5 s) is two thirds
    alice: alice's score falls from 1.0 to 0.89, and the window's last
    0.75 s, bob's, decides."""
    x = np.concatenate([tone(ALICE, 1.0), tone(BOB, 2.0)])
    got = {}
    for drop in (0.0, 0.05):
        c = blend_client(change_drop=drop)
        labs = stream_to_end(c, x)
        got[drop] = [m["label"] for m in labs]
        looked = [j for j in c.embedded if isinstance(j, LastPartJob)]
        if drop:
            # alice's score keeps falling while her speech leaves the window
            assert [j.hop.seq for j in looked] == [2, 3, 4]
            assert all(j.audio.size == int(0.75 * SR) for j in looked)
            assert labs[2]["scores"]["bob"] > labs[2]["scores"]["alice"]
        else:
            assert looked == []
    assert got[0.0] == ["alice"] * 3 + ["bob"] * 3
    assert got[0.05] == ["alice"] * 2 + ["bob"] * 4


def test_second_look_that_changes_the_label_adapts_nothing():
    """The window of hop 2 would count as a confident alice window; once its
    last part says bob, it is a mix of two talkers and teaches no one."""
    counts = {}
    for drop in (0.0, 0.05):
        c = blend_client(change_drop=drop)
        c.audio(tone(ALICE, 1.0))
        before = {k: a.count for k, a in c.engine.adapted.items()}
        c.audio(tone(BOB, 0.5))
        assert labels(c.log)[-1]["seq"] == 2
        after = {k: a.count for k, a in c.engine.adapted.items()}
        counts[drop] = {k: after[k] - before[k] for k in after}
    assert counts[0.0] == {"alice": 1, "bob": 0}
    assert counts[0.05] == {"alice": 0, "bob": 0}


def test_second_look_that_finds_only_the_background_labels_silence():
    """Carol talks on at the stream's background level (babble) and alice
    talks over her, then stops. Hop 13's window is still mostly alice, but
    its last 0.75 s is carol alone: nobody enrolled, at the background
    level, so `silence`, as a window of hers alone is, not `noise`."""
    x = tone(CAROL, 7.0, amp=0.2)
    x[int(4.0 * SR) : int(6.0 * SR)] += tone(ALICE, 2.0)
    # A tone is a steady background: the rules in any (test_speech.py has
    # them ask for babble, on real talkers).
    c = blend_client(change_drop=0.05, background_motion_db=0)
    labs = stream_to_end(c, x)
    got = [m["label"] for m in labs]
    assert got[6:8] == ["silence"] * 2  # carol alone, once the floor is known
    assert got[8:13] == ["alice"] * 5
    looked = [j.hop.seq for j in c.embedded if isinstance(j, LastPartJob)]
    assert 13 in looked
    assert got[13] == "silence"
    assert labs[13]["scores"]["alice"] < 0.35  # the last part's: under her bar


def test_no_second_look_while_one_talker_goes_on():
    c = blend_client(change_drop=0.05)
    c.audio(tone(ALICE, 3.0))
    c.send({"type": "end"})
    assert [m["label"] for m in labels(c.log)] == ["alice"] * 6
    assert not [j for j in c.embedded if isinstance(j, LastPartJob)]


def test_no_second_look_with_lookahead():
    c = blend_client(change_drop=0.05, lookahead_hops=1)
    c.audio(np.concatenate([tone(ALICE, 1.0), tone(BOB, 2.0)]))
    c.send({"type": "end"})
    assert len(labels(c.log)) == 6
    assert not [j for j in c.embedded if isinstance(j, LastPartJob)]


def test_finish_stops_at_a_second_look_and_resumes_after_it():
    """The SessionActor's loop, by hand: `finish` answers the hops before
    the one that needs a second look; new input is refused until the
    follow-up is embedded; then the rest, summary and close included."""
    c = blend_client(change_drop=0.05)
    e = c.engine
    actions = e.on_binary(c.encode(tone(ALICE, 1.0)), c.t)
    actions += e.on_binary(c.encode(tone(BOB, 0.5)), c.t + 1.0)
    actions += e.on_text(json.dumps({"type": "end"}), c.t + 1.5)
    msgs, close = e.finish(actions, [blend_embed(j.audio) for j in e.jobs(actions)])
    assert [m["seq"] for m in msgs] == [0, 1] and close is None
    with pytest.raises(RuntimeError, match="followups"):
        e.on_binary(c.encode(tone(BOB, 0.1)), c.t + 2.0)
    [part] = e.followups()
    assert isinstance(part, LastPartJob) and part.hop.seq == 2
    assert e.followups() == []  # handed out once
    msgs, close = e.finish([part], [blend_embed(part.audio)])
    assert [m["type"] for m in msgs] == ["label", "summary"]
    assert msgs[0]["seq"] == 2 and msgs[0]["label"] == "bob"
    assert close == 1000


def test_a_dropped_connection_forgets_a_pending_second_look():
    c = blend_client(change_drop=0.05)
    e = c.engine
    c.audio(tone(ALICE, 1.0))
    actions = e.on_binary(c.encode(tone(BOB, 0.5)), c.t)
    e.finish(actions, [blend_embed(j.audio) for j in e.jobs(actions)])
    assert e.followups()
    e.disconnect()
    e.reattach()
    assert e.on_text(json.dumps({"type": "stream"}), c.t) == []


def test_change_drop_setting_is_validated():
    assert Settings().change_drop == 0.1
    assert Settings.from_env(env={"DIGLETT_CHANGE_DROP": "0"}).change_drop == 0.0
    with pytest.raises(ValueError, match="CHANGE_DROP"):
        Settings.from_env(env={"DIGLETT_CHANGE_DROP": "-0.1"})


# ============================================================ hold-back hint
from diglett.engine.audio import InputFormat  # noqa: E402
from diglett.engine.holdback import HoldRule, can_hold  # noqa: E402


def _held_run(c: Client, frames: list[bytes]) -> list[tuple[int, list]]:
    """Deliver frames as the ingress does: held while `can_hold` says so
    under the engine's `hold_rule()`; returns [(index of the last frame delivered, labels)].
    """
    out, held = [], []
    for i, f in enumerate(frames):
        if can_hold(
            [(False, g, 0.0) for g in held], [(False, f, 0.0)], c.engine.hold_rule()
        ):
            held.append(f)
            continue
        held.append(f)
        labels = []
        for g in held:
            labels += [m for m in c.frame(g) if m.get("type") == "label"]
        out.append((i, labels))
        held = []
    return out


@pytest.mark.parametrize(
    "rate,encoding,frame_s",
    [(16000, "pcm_s16le", 0.1), (48000, "pcm_f32le", 0.02), (44100, "pcm_s16le", 0.13)],
)
def test_held_frames_never_delay_a_label(rate, encoding, frame_s):
    """Holding frames while `can_hold` allows it gives every label at the same
    frame as delivering each frame at once (no added latency), with fewer
    deliveries."""
    x = np.concatenate([tone(ALICE, 3.0, rate), tone(BOB, 3.1, rate)])
    step = int(frame_s * rate)
    runs = {}
    for mode in ("each", "held"):
        c = Client()
        if rate != SR or encoding != "pcm_s16le":
            c.send({"type": "format", "sample_rate": rate, "encoding": encoding})
        c.enroll_ok("alice", ALICE)
        c.enroll_ok("bob", BOB)
        c.send({"type": "stream"})
        frames = [c.encode(x[i : i + step]) for i in range(0, x.size, step)]
        if mode == "each":
            runs[mode] = [
                (i, labels)
                for i, f in enumerate(frames)
                if (labels := [m for m in c.frame(f) if m.get("type") == "label"])
            ]
        else:
            runs[mode] = [(i, ls) for i, ls in _held_run(c, frames) if ls]
    assert runs["held"] == runs["each"]
    assert len(runs["each"]) == 12  # one hop per 0.5 s


def test_hold_rule_by_state():
    from diglett.engine.session import HOLD_MAX_BYTES

    c = Client()
    assert c.engine.hold_rule().wanted == 0  # idle: stray frames answered at once
    c.send({"type": "enroll", "speaker": "alice"})
    assert c.engine.hold_rule().wanted == HOLD_MAX_BYTES
    x = bursts(ALICE, 4.0, SR)
    for i in range(0, x.size, 8000):
        c.frame(c.encode(x[i : i + 8000]))
    assert c.send({"type": "enroll_end"})[0]["type"] == "enrolled"
    c.send({"type": "stream"})
    assert c.engine.hold_rule().wanted == 8000 * 2  # a whole hop of s16
    c.frame(c.encode(tone(ALICE, 0.1)))
    assert c.engine.hold_rule().wanted == 6400 * 2
    c.send({"type": "end"})
    assert c.engine.hold_rule().wanted == 0


def test_frames_that_deserve_an_answer_are_never_held():
    f32 = InputFormat(16000, "pcm_f32le")
    rule = HoldRule(wanted=10**6, fmt=f32)
    ok = (False, np.zeros(1600, "<f4").tobytes(), 0.0)
    assert can_hold([ok], [ok], rule)
    assert not can_hold([ok], [(True, '{"type": "end"}', 0.0)], rule)
    assert not can_hold([ok], [(False, b"\0" * 6, 0.0)], rule)  # partial sample
    nan = (False, np.array([0.1, np.nan], "<f4").tobytes(), 0.0)
    assert not can_hold([ok], [nan], rule)  # bad_audio is answered now
    big = (False, np.zeros(16001, "<f4").tobytes(), 0.0)
    assert not can_hold([], [big], rule)  # frame_too_large too
    assert not can_hold([], [ok], HoldRule(wanted=6400, fmt=f32))  # a hop completes
    assert not can_hold([ok], [ok], HoldRule(wanted=12800, fmt=f32))  # held count too
    assert not can_hold([], [ok], HoldRule())  # nothing to wait for


def test_held_frames_are_checked_once():
    """Frames already held were checked when they came: only new ones are
    looked at again (so a long hold costs one check per frame)."""
    rule = HoldRule(wanted=10**6, fmt=InputFormat(16000, "pcm_s16le"))
    odd = (False, b"\0" * 3, 0.0)  # would be refused if checked again
    ok = (False, b"\0" * 320, 0.0)
    assert can_hold([odd], [ok], rule)
    assert not can_hold([ok], [odd], rule)


def test_whole_clip_is_embedded_only_as_the_fallback():
    c = Client()
    c.enroll_ok("alice", ALICE)  # 4 s of speech: sub-windows
    [job] = [j for j in c.jobs if isinstance(j, EnrollJob)]
    assert not job.embed and job not in SessionEngine.jobs(c.jobs)
    assert len(SessionEngine.jobs(c.jobs)) >= 2  # the sub-windows


def test_reconnecting_does_not_refill_the_rate_budget():
    """A client that spent its burst and reconnects (resume) may not send
    another burst at once: the bucket belongs to the session."""
    settings = ToneSettings(max_rate=20.0, rate_burst_s=10.0)
    c = Client(settings)
    c.send({"type": "enroll", "speaker": "alice"})
    data = c.encode(tone(ALICE, 1.0))
    sent, out = flood(c, data, 0.001, 9)  # 9 of the 10 s of burst
    assert errors(out) == []
    c.engine.reattach()  # the connection dropped; the client resumed
    c.send({"type": "enroll", "speaker": "alice"})
    sent, out = flood(c, data, 0.001, 100)
    assert sent <= 3 and errors(out) == ["rate_exceeded"], sent
