"""Fast tests of the benchmark's conversation builder and frame metrics."""

from __future__ import annotations

import numpy as np
import pytest

from bench import conversations as cv
from bench import metrics as mt
from conftest import SPEAKERS

SR = cv.SAMPLE_RATE


def _speechlike(rng, seconds: float, gap: tuple[float, float] | None = None):
    """Noise with a 4 Hz syllable envelope, 0.2 s of near-silence at both ends."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    x = 0.1 * env * rng.standard_normal(n)
    edge = int(0.2 * SR)
    x[:edge] = 1e-5 * rng.standard_normal(edge)
    x[-edge:] = 1e-5 * rng.standard_normal(edge)
    if gap is not None:
        a, b = int(gap[0] * SR), int(gap[1] * SR)
        x[a:b] = 1e-5 * rng.standard_normal(b - a)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def utts():
    rng = np.random.default_rng(0)
    by = {}
    for k, spk in enumerate(["S1", "S2", "S3", "S4"]):
        lens = [7.0, 3.0, 4.5, 6.0, 5.5, 3.5]
        by[spk] = [
            cv.Utterance(f"{spk}/u{i}.wav", spk, _speechlike(rng, d))
            for i, d in enumerate(lens)
        ]
        by[spk].sort(key=lambda u: (-u.audio.size, u.file))
    return by


@pytest.fixture(scope="module")
def conv(utts):
    return cv.build_conversation(np.random.default_rng(5), utts, "S1", "S2", "S3")


# ------------------------------------------------------------ conversations
def test_truth_tiles_the_signal(conv):
    truth = conv.truth
    assert truth[0][0] == 0.0
    assert truth[-1][1] == pytest.approx(conv.duration_s, abs=1e-9)
    for (s0, e0, l0), (s1, e1, l1) in zip(truth, truth[1:]):
        assert e0 == s1 and s0 < e0 and s1 < e1
        assert l0 != l1  # adjacent equal labels are merged
    assert {lab for _, _, lab in truth} <= {"S1", "S2", "noise", "silence"}
    assert truth[0][2] == "silence" and truth[-1][2] == "silence"


def test_enrollment_utterances_never_reused(utts, conv):
    enrolled = set()
    for s in ("S1", "S2", "S3"):
        enrolled |= cv.enrollment_files(utts[s])
    assert set(conv.enroll_files["S1"]) <= enrolled
    assert conv.turns and all(t.file not in enrolled for t in conv.turns)


def test_enrollment_clips_are_five_seconds_from_the_longest(utts, conv):
    for s in conv.speakers:
        assert conv.enroll[s].size == 5 * SR
        assert conv.enroll_files[s][0] == utts[s][0].file  # the longest
        assert cv.active_level_dbfs(conv.enroll[s]) == pytest.approx(-24, abs=0.5)


def test_enrollment_joins_two_utterances_when_one_is_short():
    rng = np.random.default_rng(1)
    short = [
        cv.Utterance("X/a.wav", "X", _speechlike(rng, 3.4)),
        cv.Utterance("X/b.wav", "X", _speechlike(rng, 3.0)),
        cv.Utterance("X/c.wav", "X", _speechlike(rng, 2.0)),
    ]
    clip, files = cv.enrollment_clip(short, 5.0)
    assert clip.size == 5 * SR and files == ["X/a.wav", "X/b.wav"]


def test_turns_alternate_with_third_speaker_as_noise(conv):
    speakers = [t.speaker for t in conv.turns]
    assert "S3" in speakers and speakers[0] != "S3"
    ab = [s for s in speakers if s != "S3"]
    assert all(x != y for x, y in zip(ab, ab[1:]))
    assert all(x != "S3" or y != "S3" for x, y in zip(speakers, speakers[1:]))
    for t in conv.turns:
        assert t.label == ("noise" if t.speaker == "S3" else t.speaker)
        assert 1.5 - 1e-9 <= t.end_s - t.start_s <= 4.0 + 1e-9
        assert t.level_dbfs <= -18.0 + 0.1 and t.level_dbfs >= -30.0 - 0.1


def test_pauses_and_noise_floor(conv):
    ends = [0.0] + [t.end_s for t in conv.turns]
    starts = [t.start_s for t in conv.turns] + [conv.duration_s]
    for e, s in zip(ends, starts):
        assert 0.3 - 1e-3 <= s - e <= 1.5 + 1e-3
        a, b = int(e * SR) + 400, int(s * SR) - 400
        level = 10 * np.log10(np.mean(np.square(conv.signal[a:b], dtype=np.float64)))
        assert -70 < level < -60  # the faint floor, nothing else


def test_signal_is_on_the_int16_grid(conv):
    q = conv.signal.astype(np.float64) * 32768
    assert np.array_equal(q, np.round(q))
    assert conv.signal.dtype == np.float32


def test_same_seed_same_conversation(utts):
    a = cv.build_conversation(np.random.default_rng(9), utts, "S2", "S4", "S1")
    b = cv.build_conversation(np.random.default_rng(9), utts, "S2", "S4", "S1")
    assert np.array_equal(a.signal, b.signal) and a.truth == b.truth


def test_inner_silence_and_edge_trimming():
    rng = np.random.default_rng(2)
    x = _speechlike(rng, 4.0, gap=(1.5, 2.0))
    runs = cv.quiet_runs(x)  # the 0.2 s quiet edges are too short to count
    assert len(runs) == 1
    s, e = runs[0]
    assert abs(s / SR - 1.5) <= 0.02 and abs(e / SR - 2.0) <= 0.02
    short = _speechlike(rng, 4.0, gap=(1.5, 1.7))  # 0.2 s: keeps the label
    assert cv.quiet_runs(short) == []
    s, e = cv.trim_edges(x)
    assert s == pytest.approx(0.2 * SR, abs=cv.FRAME)
    assert e == pytest.approx(3.8 * SR, abs=cv.FRAME)


def test_inner_silence_is_labelled_silence(utts):
    rng = np.random.default_rng(3)
    gappy = {
        k: [
            cv.Utterance(u.file, k, _speechlike(rng, 3.9, gap=(1.6, 2.2))) if i else u
            for i, u in enumerate(v)
        ]
        for k, v in utts.items()
    }
    c = cv.build_conversation(np.random.default_rng(4), gappy, "S1", "S2", "S3")
    inner = 0
    for t in c.turns:
        inside = [seg for seg in c.truth if t.start_s < seg[0] and seg[1] < t.end_s]
        inner += sum(1 for seg in inside if seg[2] == "silence")
    assert inner >= 1


@pytest.mark.skipif(
    not (SPEAKERS / "manifest.csv").is_file(), reason="no ../shared/data/speakers"
)
def test_real_speakers_conversation():
    utts = cv.load_speakers(SPEAKERS)
    c = cv.build_conversation(
        np.random.default_rng(0), utts, "ARCTIC-clb", "VCTK-p227", "VCTK-p228"
    )
    used = set().union(*(cv.enrollment_files(utts[s]) for s in utts))
    assert all(t.file not in used for t in c.turns)
    assert c.truth[-1][1] == pytest.approx(c.duration_s)
    sc = mt.score(c.truth, c.truth, c.speakers, duration_s=c.duration_s)
    assert sc.accuracy == 1.0 and sc.merged_accuracy == 1.0


# ------------------------------------------------------------------ metrics
def test_collar_excludes_frames_near_changes():
    truth = [(0.0, 1.0, "A1"), (1.0, 2.0, "B1")]
    ft = mt.frame_table(truth, truth, ("A1", "B1"))
    assert len(ft.centres) == 20
    # frames overlapping (0.75, 1.25): [0.7,0.8) ... [1.2,1.3) -> 6 frames
    assert list(np.flatnonzero(~ft.scored)) == [7, 8, 9, 10, 11, 12]
    sc = mt.score(truth, truth, ("A1", "B1"))
    assert sc.frames == 14 and sc.excluded == 6
    no_collar = mt.score(truth, truth, ("A1", "B1"), collar=0.0)
    assert no_collar.frames == 20


def test_collar_ignores_boundaries_without_a_label_change():
    truth = [(0.0, 1.0, "A1"), (1.0, 2.0, "A1")]
    assert mt.score(truth, truth, ("A1", "B1")).frames == 20


def test_perfect_labels_give_full_accuracy(conv):
    sc = mt.score(conv.truth, conv.truth, conv.speakers, duration_s=conv.duration_s)
    assert sc.accuracy == 1.0 and sc.merged_accuracy == 1.0
    assert (
        sc.frames > 0
        and np.count_nonzero(sc.confusion - np.diag(np.diag(sc.confusion))) == 0
    )


def test_known_confusion():
    truth = [(0.0, 10.0, "A1"), (10.0, 20.0, "silence")]
    pred = [
        {"start_s": 0.0, "end_s": 10.0, "label": "A1"},
        {"start_s": 10.0, "end_s": 15.0, "label": "noise"},
        {"start_s": 15.0, "end_s": 20.0, "label": "silence"},
    ]
    sc = mt.score(truth, pred, ("A1", "B1"), collar=0.0)
    assert sc.frames == 200
    assert sc.accuracy == pytest.approx(0.75)
    assert sc.merged_accuracy == 1.0
    assert sc.confusion[0, 0] == 100 and sc.confusion[3, 2] == 50
    assert sc.confusion[3, 3] == 50
    # with the collar, frames 97..102 go; 47 noise-for-silence frames remain
    sc = mt.score(truth, pred, ("A1", "B1"))
    assert sc.frames == 194 and sc.confusion[3, 2] == 47
    assert sc.accuracy == pytest.approx(147 / 194)


def test_speaker_swap_and_merge():
    truth = [(0.0, 2.0, "A1"), (2.0, 4.0, "B1")]
    pred = [(0.0, 4.0, "B1")]
    sc = mt.score(truth, pred, ("A1", "B1"), collar=0.0)
    assert sc.accuracy == pytest.approx(0.5)
    assert sc.merged_confusion.tolist() == [[0, 20, 0], [0, 20, 0], [0, 0, 0]]
    total = mt.total([sc, sc])
    assert total.frames == 80 and total.accuracy == pytest.approx(0.5)


def test_unknown_or_missing_labels_raise():
    truth = [(0.0, 1.0, "A1")]
    with pytest.raises(ValueError):
        mt.score(truth, [(0.0, 1.0, "carol")], ("A1", "B1"))
    with pytest.raises(ValueError):
        mt.score(truth, [(0.0, 0.5, "A1")], ("A1", "B1"))


def test_format_confusion_lists_every_class():
    text = mt.format_confusion(np.eye(4, dtype=int) * 3)
    for name in mt.CLASSES:
        assert name in text
