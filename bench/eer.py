"""Equal error rate of window-vs-enrollment trials on a folder of real speech.

Each speaker is enrolled with 5 s of its longest utterance; every 1.5 s window
(0.5 s hop, speech-gated) of its other utterances is a target trial against
it and a non-target trial against every other speaker. Prints the EER and the
threshold where false accepts equal false rejects, per speaker split.

    python -m bench.eer [--data DIR] [--speakers A,B,...] [--window-s 1.5]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.harness import SPEAKERS
from diglett.engine import levels
from diglett.engine.decision import normalize
from diglett.settings import Settings


def eer(target: np.ndarray, nontarget: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) of two score arrays; accept when score >= threshold."""
    cands = np.unique(np.concatenate([target, nontarget]))
    frr = np.array([np.mean(target < t) for t in cands])
    far = np.array([np.mean(nontarget >= t) for t in cands])
    i = int(np.argmin(np.abs(frr - far)))
    return float((frr[i] + far[i]) / 2), float(cands[i])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    ap.add_argument("--speakers", default="")
    ap.add_argument("--window-s", type=float, default=1.5)
    ap.add_argument("--model-dir", default=os.environ.get("DIGLETT_MODEL_DIR", ""))
    args = ap.parse_args()
    from diglett.model.embedder import Embedder
    from diglett.model.model_store import resolve_model_dir

    s = Settings.from_env()
    if args.model_dir:
        s = Settings(**{**s.as_dict(), "model_dir": args.model_dir})
    emb = Embedder.load(resolve_model_dir(s), "cpu")
    by: dict[str, list[tuple[float, Path]]] = {}
    for r in csv.DictReader((args.data / "manifest.csv").open()):
        by.setdefault(r["speaker"], []).append(
            (float(r["duration_s"]), args.data / r["file"])
        )
    wanted = [x for x in args.speakers.split(",") if x] or sorted(by)
    win, hop = int(args.window_s * 16000), 8000
    refs, windows = {}, {}
    for spk in wanted:
        files = [p for _, p in sorted(by[spk], reverse=True)]
        x = sf.read(files[0], dtype="float32")[0][: 5 * 16000]
        refs[spk] = normalize(emb.embed([x])[0])
        ws = []
        for f in files[1:]:
            y = sf.read(f, dtype="float32")[0]
            for end in range(win, y.size + 1, hop):
                h = y[end - hop : end]
                if levels.has_speech(h, s.gate_dbfs, s.speech_min_frac):
                    ws.append(y[end - win : end])
        windows[spk] = [normalize(e) for e in emb.embed(ws)]
    tgt, non = [], []
    for spk, es in windows.items():
        for e in es:
            for ref_spk, ref in refs.items():
                (tgt if ref_spk == spk else non).append(float(np.dot(e, ref)))
    rate, thr = eer(np.array(tgt), np.array(non))
    print(
        f"speakers {','.join(wanted)}: {len(tgt)} target / {len(non)} non-target "
        f"trials, window {args.window_s} s: EER {rate * 100:.1f} % at threshold {thr:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
