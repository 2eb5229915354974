"""bench/accuracy.py: its pieces in milliseconds, and one short live run."""

from __future__ import annotations

import numpy as np
import pytest

from bench import accuracy as acc
from bench import conversations as cv
from bench.harness import Server
from conftest import API_TOKEN, SPEAKERS, needs_model, needs_speakers

TRUTH = [(0.0, 1.0, "silence"), (1.0, 3.0, "A"), (3.0, 3.2, "silence"), (3.2, 5.0, "B")]
TRUTH += [(5.0, 6.5, "noise"), (6.5, 7.0, "silence")]


def test_window_truth_needs_one_talker_over_half_the_window():
    assert acc.window_truth(TRUTH, 1.0, 2.5) == "A"
    assert acc.window_truth(TRUTH, 0.2, 1.7) is None  # A on under half of it
    assert acc.window_truth(TRUTH, 0.5, 2.0) == "A"  # half silence, half A
    assert acc.window_truth(TRUTH, 2.5, 4.0) is None  # A and B
    assert acc.window_truth(TRUTH, 5.0, 6.5) == "noise"
    assert acc.window_truth(TRUTH, 0.0, 0.9) is None  # silence only


def test_trials_and_eer():
    windows = [
        (1.0, 2.5, {"A": 0.7, "B": 0.1}),  # A: target 0.7, non-target 0.1
        (3.5, 5.0, {"A": 0.2, "B": 0.6}),  # B
        (5.0, 6.5, {"A": 0.3, "B": 0.25}),  # C: two non-targets
        (2.5, 4.0, {"A": 0.5, "B": 0.5}),  # mixed: no trial
        (0.0, 0.5, None),  # silence: no scores
    ]
    tgt, non = acc.trials(_conv(), windows)
    assert sorted(tgt) == [0.6, 0.7]
    assert sorted(non) == [0.1, 0.2, 0.25, 0.3]
    r = acc.eer_of(tgt, non)
    assert r["eer"] == 0.0 and r["target"] == 2 and r["nontarget"] == 4
    assert acc.eer_of([], non)["eer"] is None


def _conv() -> cv.Conversation:
    rng = np.random.default_rng(1)
    sig = cv.to_int16_grid(0.01 * rng.standard_normal(7 * 16000))
    return cv.Conversation("A", "B", "C", {}, {}, sig, TRUTH)


def test_markdown_table():
    r = {"accuracy": 0.9, "merged_accuracy": 0.91, "eer": {"eer": 0.05}}
    o = {"accuracy": 0.98, "merged_accuracy": 0.985, "eer": {"eer": None}}
    md = acc.markdown({"seed": r, "ours": o})
    lines = md.strip().splitlines()
    assert lines[0] == "| method | 4-class | merged | EER |"
    assert "| 90.0 % | 91.0 % | 5.0 % |" in lines[2]
    assert lines[3].endswith("| 98.0 % | 98.5 % | — |")


def test_picture_is_a_small_png(tmp_path):
    conv = _conv()
    ours = [(0.0, 3.0, "A"), (3.0, 7.0, "B")]
    seed = [(0.0, 7.0, "noise")]
    path = tmp_path / "c.png"
    acc.picture(path, conv, ours, seed, "test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 100_000


@needs_model
@needs_speakers
@pytest.mark.model
def test_live_conversation(server, tmp_path):
    """A short conversation over the real WebSocket, and the seed baseline."""
    utts = cv.load_speakers(SPEAKERS)
    conv = cv.build_conversation(
        np.random.default_rng(3), utts, "VCTK-p228", "LS-26", "ARCTIC-clb", n_turns=4
    )
    srv = Server(server["ws"], API_TOKEN)
    got = acc.stream_conversation(srv, conv)
    assert set(got["enrolled"]) == {"VCTK-p228", "LS-26"}
    labels = got["labels"]
    assert [m["seq"] for m in labels] == list(range(len(labels)))
    assert labels[-1]["end_s"] == pytest.approx(conv.duration_s, abs=1e-3)
    assert got["summary"]["labels"] == len(labels)
    ours = acc.mt.score(conv.truth, labels, conv.speakers, duration_s=conv.duration_s)
    assert ours.accuracy > 0.8
    client = acc.EmbeddingClient(srv.http, API_TOKEN, tmp_path, "test")
    slabels, sscores = acc.seed_labels(conv, client)
    assert client.new > 10 and len(slabels) == len(sscores)
    assert slabels[-1][1] == pytest.approx(conv.duration_s, abs=1e-3)
    again = acc.EmbeddingClient(srv.http, API_TOKEN, tmp_path, "test")
    assert acc.seed_labels(conv, again)[0] == slabels
    assert again.new == 0  # all from the disk cache
