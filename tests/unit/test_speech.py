"""Speech detection, speech-part windows, adapting references and the
enrollment warnings, on real speech where it matters. Milliseconds: no
embedding model (a fixed vector stands in), no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED, load16, needs_speakers, utterances
from diglett.engine import speech
from diglett.engine.levels import BackgroundMotion, frame_dbfs
from diglett.engine import decision
from diglett.engine import session
from diglett.engine.decision import (
    ADAPT_MAX_WEIGHT,
    Adaptation,
    EmbeddingSum,
    clearly_nobody,
    closer_to_others,
    confident,
    normalize,
)
from diglett.engine.session import (
    Close,
    EnrollJob,
    EnrollWindowJob,
    HopJob,
    SessionEngine,
)
from diglett.engine.session import clip_flags, enrollment_warnings, is_background
from diglett.settings import Settings

SR = 16000
MORE = SHARED / "data" / "speakers-more"


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    """`x` scaled so that its loudest half of 20 ms frames is at `dbfs`."""
    n = x.size // 320
    ms = np.mean(np.square(x[: n * 320].reshape(n, 320), dtype=np.float64), 1)
    level = 10 * np.log10(np.mean(np.sort(ms)[n // 2 :]))
    return (x * 10 ** ((dbfs - level) / 20)).astype(np.float32)


def white(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(seconds * SR))
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)).astype(np.float32)


# ------------------------------------------------------------------ pure
def test_speech_fraction_weighs_frames_by_their_samples_inside():
    flags = np.array([True, False, True, True])
    # frames of 100 from 50: [50,150) [150,250) [250,350) [350,450)
    assert speech.speech_fraction(50, 100, flags, 50, 450) == pytest.approx(0.75)
    # [100, 300): 50 speech + 100 non-speech + 50 speech samples
    assert speech.speech_fraction(50, 100, flags, 100, 300) == pytest.approx(0.5)
    assert speech.speech_fraction(0, 100, np.zeros(0, bool), 0, 100) == 0.0


def test_last_run_start_bridges_short_gaps_only():
    f = np.array([1, 1, 0, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    assert speech.last_run_start(0, 10, f, max_gap_frames=1) == 50
    assert speech.last_run_start(0, 10, f, max_gap_frames=3) == 0
    assert speech.last_run_start(0, 10, np.zeros(4, bool), 3) is None


def test_speech_part_start_keeps_at_least_the_minimum_in_few_lengths():
    w0, end = 0, 24000
    assert speech.speech_part_start(w0, end, None, 512) == 0
    assert speech.speech_part_start(w0, end, 512, 512) == 0  # run covers it
    # a run that began 0.3 s before the end: 0.75 s kept
    assert speech.speech_part_start(w0, end, end - 4800, 512) == end - 12000
    # 1.1 s of run: rounded up to 1.25 s
    assert speech.speech_part_start(w0, end, end - 17600, 512) == end - 20000
    assert speech.speech_part_start(w0, end, 2000, 512) == 0  # never longer


def test_an_adapted_reference_keeps_the_enrollment_at_half_the_weight():
    e = normalize(np.array([1.0, 0.0, 0.0]))
    other = np.array([0.0, 1.0, 0.0])
    a = Adaptation(e)
    for _ in range(1000):
        a.add(other)
    w = ADAPT_MAX_WEIGHT
    assert a.reference @ e == pytest.approx((1 - w) / np.hypot(1 - w, w))
    assert a.reference @ e > 0.7  # never taken over, however many windows


def test_others_learn_only_from_certain_speech_that_misses_every_bar():
    bars = {"alice": 0.2, "bob": 0.25}
    far = {"alice": 0.05, "bob": 0.1}  # 0.15 under both bars
    assert clearly_nobody(far, bars, 0.95)
    assert clearly_nobody({"alice": 0.14, "bob": 0.19}, bars, 0.95)  # 0.06 under
    assert not clearly_nobody(far, bars, 0.8)  # the detector is unsure
    assert not clearly_nobody(far, bars, None)  # no probabilities: never
    assert not clearly_nobody({"alice": 0.17, "bob": 0.1}, bars, 0.95)  # near alice


def test_a_window_closer_to_the_others_than_to_its_speaker_is_theirs():
    others = EmbeddingSum()
    e = np.array([0.6, 0.8, 0.0], np.float32)
    assert not closer_to_others(e, others, 0.6, 0.55)  # none heard yet
    others.add(np.array([0.0, 2.0, 0.0]))
    others.add(np.array([0.0, 1.0, 0.0]))
    assert others.count == 2 and others.mean @ [0, 1, 0] == pytest.approx(1.0)
    assert closer_to_others(e, others, 0.6, 0.55)  # 0.8 to the others
    assert not closer_to_others(e, others, 0.85, 0.8)  # closer to the speaker
    assert not closer_to_others(e, others, 0.6, 0.45)  # a clear win stands


def test_only_clear_wins_adapt():
    bars = {"alice": 0.2, "bob": 0.2}
    assert confident({"alice": 0.5, "bob": 0.1}, bars, "alice")
    assert not confident({"alice": 0.25, "bob": 0.0}, bars, "alice")  # near bar
    assert not confident({"alice": 0.5, "bob": 0.4}, bars, "alice")  # near bob
    assert not confident({"alice": 0.5, "bob": 0.1}, bars, "noise")


# ------------------------------------------------------- on real speech
@pytest.fixture(scope="module")
def voices() -> dict[str, np.ndarray]:
    u = utterances()
    return {k: load16(v[0]) for k, v in u.items()}


def run_engine(settings: Settings, enroll: dict, stream: np.ndarray, embed):
    """Enroll and stream through a SessionEngine in 0.1 s frames; returns
    (labels, hop jobs, other messages)."""
    eng = SessionEngine(settings)
    msgs, hop_jobs = [], []

    def handle(actions):
        hop_jobs.extend(j for j in eng.jobs(actions) if isinstance(j, HopJob))
        out, _ = eng.run(actions, lambda jobs: [embed(j) for j in jobs])
        msgs.extend(out)

    def send(x):
        for i in range(0, x.size, 1600):
            pcm = (np.clip(x[i : i + 1600], -1, 1) * 32767).astype("<i2").tobytes()
            handle(eng.on_binary(pcm, 0.0))

    for name, x in enroll.items():
        handle(eng.on_text(json.dumps({"type": "enroll", "speaker": name}), 0.0))
        send(x)
        handle(eng.on_text(json.dumps({"type": "enroll_end"}), 0.0))
    handle(eng.on_text(json.dumps({"type": "stream"}), 0.0))
    send(stream)
    handle(eng.on_text(json.dumps({"type": "end"}), 0.0))
    labels = [m for m in msgs if m["type"] == "label"]
    return labels, hop_jobs, [m for m in msgs if m["type"] != "label"]


def constant(job):
    return np.array([1.0, 0.0, 0.0], np.float32)


@needs_speakers
def test_silero_finds_a_quiet_talker_and_ignores_noise_that_the_gate_takes(voices):
    """-45 dBFS speech is speech; -45 dBFS white noise alone is silence
    (hops a third speech count, so that both detectors are judged alike)."""
    x = voices["VCTK-p225"]
    enroll = {"alice": at_level(x, -25.0)}
    quiet = at_level(x, -45.0)
    noise = white(3.0, -45.0)
    stream = np.concatenate([quiet, noise])
    n_quiet = quiet.size // 8000
    for vad, want_noise in (("silero", "silence"), ("energy", "alice")):
        s = Settings(vad=vad, speech_min_frac=0.3)
        labels, _, _ = run_engine(s, enroll, stream, constant)
        speechy = [m["label"] != "silence" for m in labels[1 : n_quiet - 1]]
        assert np.mean(speechy) > 0.8, vad
        tail = [m["label"] for m in labels[n_quiet + 1 : -1]]
        if vad == "silero":
            assert tail == [want_noise] * len(tail)
        else:  # the level gate takes -45 dBFS noise for speech
            assert tail.count(want_noise) > len(tail) // 2


@needs_speakers
def test_a_window_reaching_back_over_a_pause_is_cut_to_the_new_turn(voices):
    a, b = voices["VCTK-p225"], voices["VCTK-p226"]
    turn_a = at_level(a[: 3 * SR], -25.0)
    gap = white(0.8, -70.0)
    turn_b = at_level(b[: 3 * SR], -25.0)
    stream = np.concatenate([turn_a, gap, turn_b])
    _, jobs, _ = run_engine(Settings(), {"alice": at_level(a, -25)}, stream, constant)
    b_start = turn_a.size + gap.size
    first_b = [j for j in jobs if j.end_s * SR > b_start + 4000][0]
    assert first_b.window.size < Settings().window_samples
    # it starts within a VAD frame or two of B's first sample
    start = first_b.end_s * SR - first_b.window.size
    assert start >= b_start - 2 * 512 - 4000
    deep = [j for j in jobs if j.end_s * SR > b_start + 2.5 * SR][0]
    assert deep.window.size == Settings().window_samples  # inside a turn: whole


@needs_speakers
def test_enrollment_warnings_on_real_cases(voices):
    s = Settings()
    x = at_level(voices["VCTK-p227"], -24.0)

    def warn(clip):
        return enrollment_warnings(clip, clip_flags(clip, s), False)

    assert warn(x) == []
    assert "quiet" in warn(at_level(x, -48.0))
    assert "quiet" not in warn(at_level(x, -36.0))
    assert "noisy" in warn(x + white(x.size / SR, -30.0)[: x.size])
    assert "noisy" not in warn(x + white(x.size / SR, -60.0)[: x.size])
    clipped = np.clip(x * 30, -1, 1).astype(np.float32)
    assert "clipping" in warn(clipped)


@needs_speakers
@pytest.mark.skipif(not (MORE / "manifest.csv").is_file(), reason="no speakers-more")
def test_recorded_noise_at_5_to_10_db_snr_is_noisy_and_studio_takes_are_not():
    s = Settings()
    noisy = sorted((MORE / "IEEE-LoizouM").glob("*_snr*.wav"))
    assert len(noisy) == 4
    for path in noisy:
        x = load16(path)
        assert "noisy" in enrollment_warnings(x, clip_flags(x, s), False), path.name
    for paths in utterances().values():
        for path in paths:
            x = load16(path)
            w = enrollment_warnings(x, clip_flags(x, s), False)
            assert "noisy" not in w, (path.name, w)


@needs_speakers
def test_a_long_enrollment_counts_all_of_its_speech(voices):
    """8 s of speech, then 17 s of a quiet floor: the whole 25 s clip is
    judged, not the detector's last seconds of history (a stream needs only
    a window's worth; a clip needs all of it)."""
    talk = at_level(np.concatenate(list(voices.values()))[: 8 * SR], -25.0)
    clip = np.concatenate([talk, white(17.0, -70.0)])
    flags = clip_flags(clip, Settings())
    assert flags.first == 0 and flags.flags.size == clip.size // 512
    assert speech.speech_seconds(flags.frame, flags.flags) > 6.0
    _, _, other = run_engine(Settings(), {"alice": clip}, white(2.0, -70.0), constant)
    enrolled = [m for m in other if m["type"] == "enrolled"]
    assert enrolled and enrolled[0]["speech_s"] > 6.0, other


@needs_speakers
def test_a_soft_enrollment_in_noise_is_heard_at_a_gain():
    """The IEEE talker's fridge-noise recording at -45 dBFS between two
    seconds of a -70 dBFS floor: Silero alone finds under the 1.5 s of
    speech an enrollment needs; scored again at +30 dB, it enrolls."""
    x = load16(MORE / "IEEE-LoizouM" / "IEEE-LoizouM_S_02_02_fridge_snr5.wav")
    clip = np.concatenate([white(1.0, -70.0), at_level(x, -45.0), white(1.0, -70.0)])

    def replies(gain_db):
        s = Settings(quiet_gain_db=gain_db)
        other = run_engine(s, {"alice": clip}, white(1.0, -70.0), constant)[2]
        return [m.get("code", m["type"]) for m in other if m["type"] != "ready"]

    assert "enroll_too_short" in replies(0.0)
    assert "enrolled" in replies(30.0)


@needs_speakers
def test_mostly_silent_enrollment_is_too_short_however_long(voices):
    """5 s of audio holding ~1 s of speech: `enroll_too_short`, as the VAD
    counts speech (the level gate counted the noise floor in)."""
    x = at_level(voices["VCTK-p228"][:SR], -25.0)
    clip = np.concatenate([x, white(4.0, -50.0)])
    eng = SessionEngine(Settings())
    eng.on_text(json.dumps({"type": "enroll", "speaker": "alice"}), 0.0)
    eng.on_binary((clip * 32767).astype("<i2").tobytes()[: 2 * SR], 0.0)
    for i in range(SR, clip.size, SR):
        eng.on_binary((clip[i : i + SR] * 32767).astype("<i2").tobytes(), 0.0)
    out = eng.on_text(json.dumps({"type": "enroll_end"}), 0.0)
    assert out[0]["code"] == "enroll_too_short", out
    assert not any(isinstance(a, (EnrollJob, EnrollWindowJob, Close)) for a in out)


def test_window_lengths_are_the_parts_then_the_window():
    assert speech.window_lengths(24000) == [12000, 16000, 20000, 24000]
    assert speech.window_lengths(12000) == [12000]


def test_a_restored_session_scores_and_adapts_every_speaker():
    """SessionActor.restore seeds speakers through `set_reference`; their
    labels carry every speaker's score (a restore once left them empty)."""
    eng = SessionEngine(Settings(vad="energy"))
    eng.set_reference("alice", normalize(np.array([1.0, 0.0, 0.0])), 0.8)
    eng.set_reference("bob", normalize(np.array([0.0, 1.0, 0.0])), 0.8)
    eng.on_text(json.dumps({"type": "stream"}), 0.0)
    x = (white(1.0, -20.0) * 32767).astype("<i2").tobytes()
    acts = eng.on_binary(x, 0.0)
    out, _ = eng.finish(acts, [np.array([1.0, 0.0, 0.0])] * len(eng.jobs(acts)))
    labels = [m for m in out if m["type"] == "label"]
    assert len(labels) == 2
    for m in labels:
        assert m["label"] == "alice" and set(m["scores"]) == {"alice", "bob"}
    assert eng.adapted["alice"].count == 2 and eng.adapted["bob"].count == 0


def test_quiet_frames_stand_over_the_background_under_the_threshold():
    over = speech.QUIET_OVER_DB
    levels = -70.0 + over + np.array([10.0, 10.0, 0.0, -0.5])
    probs = np.array([0.1, 0.9, 0.1, 0.1])
    quiet = speech.quiet_frames(levels, probs, floor_dbfs=-70.0, threshold=0.4)
    assert quiet.tolist() == [True, False, True, False]


@needs_speakers
def test_quiet_speech_in_recorded_noise_is_found_at_a_gain():
    """The IEEE talker's recording with fridge noise at 5 dB SNR, placed at
    -39 dBFS over a -70 dBFS floor: Silero passes it all as silence at its
    own level; scored again at +30 dB, most of its hops are speech."""
    x = load16(MORE / "IEEE-LoizouM" / "IEEE-LoizouM_S_02_02_fridge_snr5.wav")
    stream = np.concatenate([white(4.0, -70.0), at_level(x, -39.0), white(1.0, -70)])
    enroll = {"alice": at_level(x, -20.0)}

    def labels(gain_db):
        s = Settings(quiet_gain_db=gain_db)
        return [m["label"] for m in run_engine(s, enroll, stream, constant)[0]]

    off, on = labels(0.0), labels(30.0)
    talk = slice(8, 14)  # the hops wholly inside the recording
    assert off[talk] == ["silence"] * 6
    assert on[talk].count("alice") >= 3
    assert on[:8] == off[:8] == ["silence"] * 8  # the floor is never raised


def test_the_quiet_recheck_leaves_the_background_alone():
    """Frames at the stream's floor are not scored again; with
    no floor known yet, or a gain of 0, nothing is."""
    det = speech.SileroDetector()
    noise = white(2.0, -50.0)
    det.push(noise)
    det.frame_flags(0, noise)  # scores what was pushed
    before = det._vad.frame_probs(0, noise.size).copy()
    assert before.size == 62
    assert det.recheck_quiet(0, noise[:24000], 16000, -50.0, 30.0) == 0
    assert det.recheck_quiet(0, noise[:24000], 16000, None, 30.0) == 0
    assert det.recheck_quiet(0, noise[:24000], 16000, -90.0, 0.0) == 0
    np.testing.assert_array_equal(det._vad.frame_probs(0, noise.size), before)
    energy = speech.EnergyDetector(-55.0)
    assert energy.recheck_quiet(0, noise[:24000], 16000, -90.0, 30.0) == 0


def test_quiet_gain_setting_is_validated():
    assert Settings.from_env(env={"DIGLETT_QUIET_GAIN_DB": "0"}).quiet_gain_db == 0
    for bad in ("-1", "61", "loud"):
        with pytest.raises(ValueError, match="DIGLETT_QUIET_GAIN_DB"):
            Settings.from_env(env={"DIGLETT_QUIET_GAIN_DB": bad})


def test_mean_speech_prob_is_over_the_speech_frames_only():
    probs = np.array([0.1, 0.6, 0.8, 0.3], np.float32)
    assert speech.mean_speech_prob(probs, 0.5) == pytest.approx(0.7)
    assert speech.mean_speech_prob(probs[[0, 3]], 0.5) == 0.0


def test_uncertain_speech_is_background_only_while_the_rule_is_on():
    assert is_background(0.6, Settings(background_prob=0.7))
    assert not is_background(0.75, Settings(background_prob=0.7))
    assert not is_background(0.6, Settings(background_prob=0.0))
    assert not is_background(None, Settings(background_prob=0.7))  # level gate


def test_speech_barely_over_the_streams_floor_is_background():
    s = Settings(background_prob=0.0, background_margin_db=3.0)
    assert is_background(0.99, s, level_dbfs=-47.5, floor_dbfs=-50.0)
    assert not is_background(0.99, s, level_dbfs=-46.5, floor_dbfs=-50.0)
    assert not is_background(0.99, s, level_dbfs=-49.0, floor_dbfs=None)  # unknown
    off = Settings(background_prob=0.0, background_margin_db=0.0)
    assert not is_background(0.99, off, level_dbfs=-50.0, floor_dbfs=-50.0)


@needs_speakers
def test_faint_babble_matching_nobody_is_silence_a_clear_intruder_noise(voices):
    """Six talkers at once, faint over a floor, are speech the detector is
    unsure of: `silence` by the background rule (`noise` without it); one
    clear talker that matches nobody stays `noise`."""
    names = sorted(voices)
    alice, others = names[0], names[1:]
    n = 4 * SR
    babble = sum(at_level(voices[k][:n], -50.0) for k in others) + white(4.0, -66.0)
    intruder = at_level(voices[others[0]][:n], -30.0)
    stream = np.concatenate([babble, white(1.0, -66.0), intruder])
    enroll = {"alice": at_level(voices[alice], -25.0)}

    def embed(job):  # alice's enrollment; every stream window is somebody else
        return np.array([0.0, 1.0, 0.0] if isinstance(job, HopJob) else [1, 0, 0], "f")

    def speech_labels(settings, lo_s, hi_s):
        labels, _, _ = run_engine(settings, enroll, stream, embed)
        return [
            m["label"]
            for m in labels
            if "scores" in m and lo_s <= m["start_s"] and m["end_s"] <= hi_s
        ]

    on = Settings(background_prob=0.7, background_margin_db=0.0)
    off = Settings(background_prob=0.0, background_margin_db=0.0)
    bab_on, bab_off = speech_labels(on, 0.0, 4.0), speech_labels(off, 0.0, 4.0)
    assert len(bab_off) >= 3 and set(bab_off) == {"noise"}
    assert bab_on.count("silence") > len(bab_on) / 2
    talker = speech_labels(on, 5.5, 9.0)
    assert len(talker) >= 5 and set(talker) == {"noise"}


@needs_speakers
def test_steady_background_matching_nobody_becomes_silence_a_talker_stays_noise(
    voices,
):
    """Steady noise the level gate takes for speech, then a real talker who
    matches nobody: once 3 s of the stream are known, hops at its background
    level are `silence`, the talker (far over it) `noise`; without the rule
    both are `noise`. (With the level gate the rules hold in any
    background; with Silero they ask for babble, a test below.)"""
    names = sorted(voices)
    talker = at_level(voices[names[1]][: 3 * SR], -25.0)
    stream = np.concatenate([white(6.0, -50.0), talker])
    enroll = {"alice": at_level(voices[names[0]], -25.0)}

    def embed(job):  # every stream window is somebody else
        return np.array([0.0, 1.0, 0.0] if isinstance(job, HopJob) else [1, 0, 0], "f")

    def labels(margin):
        s = Settings(vad="energy", background_margin_db=margin)
        return [m["label"] for m in run_engine(s, enroll, stream, embed)[0]]

    on, off = labels(3.0), labels(0.0)
    assert off[:12] == ["noise"] * 12
    assert on[:5] == ["noise"] * 5  # the floor is not known yet
    assert on[5:12] == ["silence"] * 7  # known from the sixth hop's blocks
    assert on[13:17] == off[13:17] == ["noise"] * 4


@needs_speakers
def test_a_talker_with_only_short_gaps_stands_out_of_the_background(voices):
    """An intruder talking on and on: 1 s pieces of their speech (their own
    pauses cut out) with 0.25 s gaps over a -66 dBFS floor. No whole hop is
    a gap, yet the background level comes from the gaps (0.1 s blocks), so
    the intruder stays `noise`. Measured on whole hops (0.5 s blocks) the
    background is the talker's own quieter hops, and most of their hops
    are taken for background (`silence`)."""
    names = sorted(voices)
    talk = np.concatenate([load16(p) for p in utterances()[names[1]]])
    blocks = talk[: talk.size // 1600 * 1600].reshape(-1, 1600)
    ms = np.mean(np.square(blocks, dtype=np.float64), axis=1)
    voiced = at_level(blocks[ms > np.percentile(ms, 40)].reshape(-1), -30.0)
    gap = np.zeros(SR // 4, np.float32)
    stream = np.concatenate(
        [p for i in range(12) for p in (voiced[i * SR :][:SR], gap)]
    )
    stream = stream + white(stream.size / SR, -66.0)[: stream.size]
    enroll = {"alice": at_level(voices[names[0]], -25.0)}

    def embed(job):  # every stream window is somebody else
        return np.array([0.0, 1.0, 0.0] if isinstance(job, HopJob) else [1, 0, 0], "f")

    def late_labels():
        labels, _, _ = run_engine(Settings(background_prob=0.0), enroll, stream, embed)
        return [m["label"] for m in labels if m["start_s"] >= 4.0 and "scores" in m]

    late = late_labels()
    assert len(late) >= 15 and set(late) == {"noise"}
    with pytest.MonkeyPatch.context() as mp:  # whole hops: the old estimate
        mp.setattr(session, "FLOOR_BLOCK_S", 0.5)
        mp.setattr(session, "FLOOR_BLOCK", SR // 2)
        assert late_labels().count("silence") > len(late) / 2


@needs_speakers
def test_a_talker_from_the_first_second_is_not_their_own_background(voices):
    """An intruder who talks from the stream's first moment, in a quiet
    room: the background level is known only after `FLOOR_LEAST_S` (3 s),
    so it comes from the dips of their talk, and their first hops stay
    `noise`. Known after 1 s, the floor of continuous speech is the talk
    itself, and most of those hops were taken for the background
    (`silence`); the dev set, whose conversations all open with a pause
    and never with the intruder, cannot see that (docs/accuracy.md)."""
    names = sorted(voices)
    talk = np.concatenate([load16(p) for p in utterances()[names[1]]])[: 6 * SR]
    start = int(np.argmax(frame_dbfs(talk) > np.percentile(frame_dbfs(talk), 50)))
    talk = at_level(talk[start * 320 :], -25.0)
    stream = talk + white(talk.size / SR, -66.0)[: talk.size]
    enroll = {"alice": at_level(voices[names[0]], -25.0)}

    def embed(job):  # every stream window is somebody else
        return np.array([0.0, 1.0, 0.0] if isinstance(job, HopJob) else [1, 0, 0], "f")

    def first_hops():
        labels, _, _ = run_engine(Settings(), enroll, stream, embed)
        return [m["label"] for m in labels[:5]]

    assert first_hops() == ["noise"] * 5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "FLOOR_LEAST_S", 1.0)
        assert first_hops().count("silence") >= 3


@needs_speakers
def test_background_that_only_brushes_alices_bar_is_silence_a_talker_keeps_it(
    voices,
):
    """Steady noise the level gate takes for speech, whose windows just
    reach alice's bar (0.3, by 0.05), then a talker as faint a match but
    over the background: once the floor is known the noise's hops are
    `silence`, the talker's alice. A clear match (by 0.3) keeps alice even
    at the background level, and without the background level every hop is
    alice."""
    names = sorted(voices)
    talker = at_level(voices[names[1]][: 3 * SR], -25.0)
    stream = np.concatenate([white(6.0, -50.0), talker])
    enroll = {"alice": at_level(voices[names[0]], -25.0)}

    def labels(margin, alice_cosine):
        def embed(job):
            if not isinstance(job, HopJob):
                return np.array([1.0, 0.0, 0.0], "f")
            return np.array([alice_cosine, np.sqrt(1 - alice_cosine**2), 0.0], "f")

        s = Settings(vad="energy", background_margin_db=margin)
        return [m["label"] for m in run_engine(s, enroll, stream, embed)[0]]

    faint, off = labels(3.0, 0.35), labels(0.0, 0.35)
    assert off[:12] == ["alice"] * 12
    assert faint[:5] == ["alice"] * 5  # the floor is not known yet
    assert faint[5:12] == ["silence"] * 7
    assert faint[13:17] == off[13:17] == ["alice"] * 4
    clear = labels(3.0, 0.6)
    assert clear[:12] + clear[13:17] == ["alice"] * 16


@needs_speakers
def test_background_rules_hold_in_babble_not_in_steady_noise(voices):
    """Speech that matches nobody at the stream's background level (Silero
    VAD). In babble of six real talkers, whose spectrum moves, the rules
    hold as in any background: its faint hops are `silence`. In steady
    white noise they do not: an intruder 3 dB over it stays `noise`, where
    in any background (`background_motion_db` 0) most of their hops were
    taken for the background."""
    names = sorted(voices)
    n = 9 * SR
    babble = sum(at_level(voices[k][:n], -50.0) for k in names[1:7])
    babble = babble + white(9.0, -66.0)
    motion = BackgroundMotion(400, 10, 1.0)
    motion.extend(babble, 1600, frame_dbfs(babble, 1600))
    floor = float(np.percentile(frame_dbfs(babble, 1600), 10))
    assert motion.spread_db(floor) > 2.8
    enroll = {"alice": at_level(voices[names[0]], -25.0)}

    def embed(job):  # every stream window is somebody else
        return np.array([0.0, 1.0, 0.0] if isinstance(job, HopJob) else [1, 0, 0], "f")

    def labels(stream, motion_db):
        s = Settings(
            background_prob=0.0,
            background_margin_db=4.0,
            background_motion_db=motion_db,
        )
        return [m["label"] for m in run_engine(s, enroll, stream, embed)[0]]

    in_babble = labels(babble, 2.8)
    assert in_babble.count("silence") >= 10 and "noise" in in_babble
    assert in_babble == labels(babble, 0.0)
    # were the babble steady, the rules would stop once that is known
    assert labels(babble, 50.0).count("noise") > in_babble.count("noise") + 3
    steady = white(8.0, -50.0)
    steady[4 * SR :] += at_level(voices[names[1]][: 4 * SR], -47.0)
    intruder, anywhere = labels(steady, 2.8)[8:], labels(steady, 0.0)[8:]
    assert intruder.count("noise") >= 5 and anywhere.count("noise") <= 2


@needs_speakers
def test_an_intruder_heard_clearly_once_is_not_taken_for_alice_later(
    voices, monkeypatch
):
    """An intruder's first windows are far from alice (they join the
    session's others); later windows of theirs just reach alice's bar (0.3)
    but are closer to the others: `noise`, where without them they were alice."""
    names = sorted(voices)
    talk = at_level(voices[names[1]], -25.0)[: 5 * SR]
    stream = np.concatenate([white(0.5, -70.0), talk])
    enroll = {"alice": at_level(voices[names[0]], -25.0)}
    far, near = [0.0, 1.0, 0.0], [0.35, 0.937, 0.0]  # alice's cosines 0 / 0.35

    def embed(job):
        if not isinstance(job, HopJob):
            return np.array([1.0, 0.0, 0.0], "f")
        return np.array(far if job.end_s <= 2.5 else near, "f")

    def late_labels():
        labels = run_engine(Settings(), enroll, stream, embed)[0]
        return [m["label"] for m in labels if m["start_s"] >= 3.0 and "scores" in m]

    with_others = late_labels()
    monkeypatch.setattr(decision, "OTHERS_MIN_CONF", float("inf"))
    without = late_labels()
    assert len(without) >= 4 and set(without) == {"alice"}
    assert with_others == ["noise"] * len(without)
