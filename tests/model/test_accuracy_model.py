"""Real model, real speech: the server's exact decision logic, run offline.

Two dev-set speakers are enrolled through `SessionEngine`; their unseen
utterances must get their names, a third speaker `noise`, near-silence
`silence`. (The same path over the WebSocket is in test_serve_e2e.py.)
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import load16, model_dir, needs_model, needs_speakers, to_s16, utterances
from diglett.engine.session import SessionEngine
from diglett.settings import Settings

pytestmark = [needs_model, needs_speakers, pytest.mark.model]


@pytest.fixture(scope="module", params=["fp32", "int8"])
def embedder(request):
    """Both CPU precisions must label the same (int8 is the server's default)."""
    from diglett.model.embedder import Embedder

    return Embedder.load(model_dir(), "cpu", request.param)


def run(engine: SessionEngine, embedder, items) -> list[dict]:
    """Feed (text | bytes) items; compute jobs with the real model."""
    out = []
    for item in items:
        if isinstance(item, str):
            actions = engine.on_text(item, 0.0)
        else:
            actions = engine.on_binary(item, 0.0)
        out.extend(
            engine.run(actions, lambda js: embedder.embed([j.audio for j in js]))[0]
        )
    return out


def frames(x: np.ndarray, n: int = 1600) -> list[bytes]:
    return [to_s16(x[i : i + n]) for i in range(0, x.size, n)]


def labels_of(x: np.ndarray, engine, embedder) -> list[str]:
    msgs = run(engine, embedder, [json.dumps({"type": "stream"}), *frames(x)])
    msgs += run(engine, embedder, [json.dumps({"type": "stream"})])  # final hop
    return [m["label"] for m in msgs if m["type"] == "label"]


@pytest.mark.parametrize(
    # A third speaker of the same corpus and sex as an enrolled one (e.g.
    # VCTK-p227 beside VCTK-p226) scores 0.25-0.35 on 1.5 s windows and is
    # often taken for them at the default threshold: see README, Accuracy.
    "a,b,c",
    [("LS-19", "VCTK-p226", "ARCTIC-clb"), ("VCTK-p228", "LS-26", "VCTK-p227")],
)
def test_enrolled_speakers_noise_and_silence(embedder, a, b, c):
    u = utterances()
    engine = SessionEngine(Settings.from_env(env={}))
    for name in (a, b):
        enroll = load16(u[name][0])[: 5 * 16000]
        got = run(
            engine,
            embedder,
            [
                json.dumps({"type": "enroll", "speaker": name}),
                *frames(enroll),
                json.dumps({"type": "enroll_end"}),
            ],
        )
        assert got[-1]["type"] == "enrolled", got
    for name, other in ((a, b), (b, a)):
        test = load16(u[name][2])[: 6 * 16000]  # unseen utterance
        counts = Counter(labels_of(test, engine, embedder))
        speechy = sum(v for k, v in counts.items() if k != "silence")
        # The first hop's window is only 0.5 s long and pauses inside an
        # utterance may read as `noise`; the other speaker must not appear.
        assert counts[name] >= 0.7 * speechy, (name, counts)
        assert counts[other] <= 1, (name, counts)
    third = load16(u[c][1])[: 6 * 16000]
    counts = Counter(labels_of(third, engine, embedder))
    speechy = sum(v for k, v in counts.items() if k != "silence")
    assert counts["noise"] >= 0.7 * speechy, (c, counts)
    rng = np.random.default_rng(0)
    hush = (rng.standard_normal(3 * 16000) * 10 ** (-70 / 20)).astype(np.float32)
    assert set(labels_of(hush, engine, embedder)) == {"silence"}
