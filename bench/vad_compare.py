"""Which voice-activity detector should replace the energy gate?

Compares, on real speech, the server's energy gate (`diglett/engine/levels.py`:
-55 dBFS on 20 ms frames, 40 % of a hop's frames), WebRTC VAD (modes 0-3),
Silero VAD (ONNX through `diglett/engine/vad.py`, no torch) and TEN VAD.

Test set (all speech real, from ../shared/data/speakers{,-more}; the
"noisy mix" corpus is left out since its reference must come from clean
audio): `--utterances` utterances spread over every clean corpus, each
edge-trimmed (20 dB, as bench/conversations.py does) and given a reference
mask on the clean audio: a 20 ms frame is speech when it is within 30 dB of
the utterance's active level, and gaps < 0.3 s between speech frames are
closed. The utterances are cut into `--items` items, each the concatenation
of its utterances with 0.3-2 s of digital silence between (and before and
after) them, so the pauses are non-speech by construction. Conditions:

- level-45 / level-30 / level-12: every utterance at that active level;
- white/pink 30/15/5: speech at -30 dBFS plus stationary noise at that SNR
  (active speech level over noise RMS);
- babble 20/10: speech at -30 dBFS plus the sum of 4-6 other speakers'
  utterances (speakers not in the item, utterances not in the test set),
  continuous, at that SNR; the pauses stay non-speech in the truth.

A -65 dBFS white floor lies under everything and the signal is quantised to
the int16 grid. Each detector sees each item streamed in one pass (frame
scores are computed once, thresholds applied afterwards).

Metrics per condition (pooled over items): on the 20 ms truth frames (a
detector frame's decision applied at the truth frame's centre) frame
accuracy, speech recall, non-speech precision and non-speech recall; per
0.5 s hop (truth: >= 50 % of its frames speech; a VAD's hop is speech when
>= `--hop-frac` of its samples lie in speech frames; the energy gate uses the
server's own `levels.has_speech` rule) the same four. Summary rows give the
mean over conditions and the worst condition.

WebRTC VAD and TEN VAD are not dependencies of Diglett: install them to
rerun (`.venv/bin/pip install webrtcvad-wheels ten-vad`; TEN's library also
needs Debian's `libc++1`).

Cost: CPU time (time.thread_time) per 0.5 s hop of audio streamed in 0.1 s
pushes, single-threaded, including the per-hop `speech_fraction` query; and,
in a fresh process each, import + creation time and RSS delta of one
detector (numpy already imported).

    .venv/bin/python -m bench.vad_compare            # ~3-5 min on one core
    .venv/bin/python -m bench.vad_compare --quick    # fewer items
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from bench import conversations as cv  # noqa: E402
from diglett.engine import levels  # noqa: E402

SR = 16000
FRAME = 320  # truth frame: 20 ms
HOP = 8000  # 0.5 s
PUSH = 1600  # 0.1 s streaming pushes in the cost measurement
DATA = ROOT.parent / "shared" / "data"
FOLDERS = (DATA / "speakers", DATA / "speakers-more")
RESULTS = ROOT / "bench" / "results" / "vad_compare.json"
NOISE_LEVEL_DBFS = -30.0  # speech level of the noise and babble conditions
FLOOR_DBFS = -65.0


# ------------------------------------------------------------------ data
@dataclass
class Utt:
    path: Path
    speaker: str
    corpus: str


def manifest() -> list[Utt]:
    """Every clean utterance of both data folders."""
    rows = []
    for folder in FOLDERS:
        with (folder / "manifest.csv").open() as f:
            for r in csv.DictReader(f):
                if "noisy" in r["corpus"].lower():
                    continue
                rows.append(Utt(folder / r["file"], r["speaker"], r["corpus"]))
    return rows


def load(path: Path) -> np.ndarray:
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == SR, path
    return np.ascontiguousarray(x.mean(axis=1), dtype=np.float32)


def trimmed(path: Path) -> np.ndarray:
    """Edge-trimmed clean utterance, zero-padded to whole 20 ms frames."""
    x = load(path)
    a, b = cv.trim_edges(x)
    x = x[a:b]
    pad = (-x.size) % FRAME
    return np.concatenate([x, np.zeros(pad, np.float32)]) if pad else x


def reference_mask(x: np.ndarray, rel_db: float = 30.0, gap_s: float = 0.3):
    """Speech flag of each 20 ms frame of clean `x`, shape (x.size // 320,)."""
    db = cv.frame_dbfs(x)
    m = db >= cv.active_level_dbfs(x) - rel_db
    idx = np.flatnonzero(m)
    max_gap = int(round(gap_s * SR / FRAME))
    for a, b in zip(idx[:-1], idx[1:]):
        if 1 < b - a <= max_gap:  # gap of b - a - 1 frames < 0.3 s
            m[a:b] = True
    return m


def scale_to(x: np.ndarray, dbfs: float) -> np.ndarray:
    return x * np.float32(10 ** ((dbfs - cv.active_level_dbfs(x)) / 20))


def pick(utts: list[Utt], n: int, rng) -> list[Utt]:
    """About `n` utterances, the same number from each corpus, spread over
    its speakers (round robin), 1.5-16 s long."""
    corpora = sorted({u.corpus for u in utts})
    per = int(np.ceil(n / len(corpora)))
    chosen = []
    for c in corpora:
        by: dict[str, list[Utt]] = {}
        for u in utts:
            if u.corpus == c and 1.5 <= sf.info(u.path).duration <= 16.0:
                by.setdefault(u.speaker, []).append(u)
        for v in by.values():
            rng.shuffle(v)
        spk = sorted(by)
        rng.shuffle(spk)
        k = 0
        while k < per and any(by.values()):
            for s in spk:
                if by[s] and k < per:
                    chosen.append(by[s].pop())
                    k += 1
    return chosen


@dataclass
class Item:
    utts: list[np.ndarray]  # trimmed clean utterances
    offsets: list[int]  # start sample of each
    n: int  # samples
    truth: np.ndarray  # (n // 320,) bool
    speakers: set
    babble: np.ndarray  # (n,) float32, unit RMS


def build_items(n_utts: int, n_items: int, seed: int) -> tuple[list[Item], dict]:
    rng = np.random.default_rng(seed)
    pool = manifest()
    test = pick(pool, n_utts, rng)
    order = rng.permutation(len(test))
    groups = [[test[i] for i in order[k::n_items]] for k in range(n_items)]
    test_paths = {u.path for u in test}
    rest_by_spk: dict[str, list[Utt]] = {}
    for u in pool:
        if u.path not in test_paths:
            rest_by_spk.setdefault(u.speaker, []).append(u)
    items = []
    for g in groups:
        clean = [trimmed(u.path) for u in g]
        gaps = [int(rng.uniform(0.3, 2.0) * SR) // FRAME * FRAME for _ in g]
        gaps.append(int(rng.uniform(0.3, 2.0) * SR) // FRAME * FRAME)
        offsets, pos, truth = [], 0, []
        for x, gap in zip(clean, gaps):
            pos += gap
            truth.append(np.zeros(gap // FRAME, bool))
            offsets.append(pos)
            truth.append(reference_mask(x))
            pos += x.size
        pos += gaps[-1]
        truth.append(np.zeros(gaps[-1] // FRAME, bool))
        spk = {u.speaker for u in g}
        babble = make_babble(pos, spk, rest_by_spk, rng)
        items.append(Item(clean, offsets, pos, np.concatenate(truth), spk, babble))
    info = {
        "utterances": [str(u.path.relative_to(DATA)) for u in test],
        "corpora": sorted({u.corpus for u in test}),
        "speech_s": float(sum(x.size for it in items for x in it.utts) / SR),
        "total_s": float(sum(it.n for it in items) / SR),
    }
    return items, info


def make_babble(n, exclude, rest_by_spk, rng) -> np.ndarray:
    """Sum of 4-6 other talkers, each continuous over n samples at equal
    active level; unit RMS, shape (n,)."""
    others = sorted(s for s in rest_by_spk if s not in exclude)
    talkers = rng.choice(others, size=int(rng.integers(4, 7)), replace=False)
    out = np.zeros(n, np.float64)
    for s in talkers:
        utts = list(rest_by_spk[s])
        rng.shuffle(utts)
        parts, got, k = [], 0, 0
        while got < n:
            x = trimmed(utts[k % len(utts)].path)
            parts.append(scale_to(x, -30.0))
            got += x.size
            k += 1
        y = np.concatenate(parts)
        start = int(rng.integers(0, max(1, y.size - n)))
        out += y[start : start + n]
    return (out / np.sqrt(np.mean(out**2))).astype(np.float32)


CONDITIONS = [
    "level-45",
    "level-30",
    "level-12",
    "white30",
    "white15",
    "white5",
    "pink30",
    "pink15",
    "pink5",
    "babble20",
    "babble10",
]


def render(item: Item, cond: str, seed: int) -> np.ndarray:
    """The item's signal under `cond`, float32 on the int16 grid, shape (n,)."""
    rng = np.random.default_rng(seed)
    level = (
        float(cond[len("level") :]) if cond.startswith("level") else NOISE_LEVEL_DBFS
    )
    x = np.zeros(item.n, np.float32)
    for u, off in zip(item.utts, item.offsets):
        x[off : off + u.size] = scale_to(u, level)
    if not cond.startswith("level"):
        kind = cond.rstrip("0123456789")
        snr = float(cond[len(kind) :])
        noise_db = level - snr
        if kind == "babble":
            noise = item.babble
        else:
            noise = cv.noise_floor(rng, item.n, 0.0, kind)
        x = x + noise * np.float32(10 ** (noise_db / 20))
    x = x + cv.noise_floor(rng, item.n, FLOOR_DBFS, "white")
    return cv.to_int16_grid(np.clip(x, -1.0, 32767 / 32768))


# ------------------------------------------------------------- detectors
class EnergyStream:
    """levels.frame_dbfs of 20 ms frames: score = dBFS."""

    frame = FRAME

    def __init__(self) -> None:
        self.rest = np.zeros(0, np.float32)
        self.scores: list[np.ndarray] = []

    def push(self, x: np.ndarray) -> None:
        x = np.concatenate([self.rest, x])
        n = x.size // FRAME * FRAME
        if n:
            self.scores.append(levels.frame_dbfs(x[:n]))
        self.rest = x[n:]

    def all_scores(self) -> np.ndarray:
        return np.concatenate(self.scores) if self.scores else np.zeros(0)


class Int16FrameStream:
    """Cuts a float stream into `frame`-sample int16 frames for a detector
    that scores one frame per call (`score(frame) -> float`)."""

    def __init__(self, frame: int) -> None:
        self.frame = frame
        self.rest = np.zeros(0, np.float32)
        self.scores: list[float] = []

    def score(self, pcm: np.ndarray) -> float:
        raise NotImplementedError

    def push(self, x: np.ndarray) -> None:
        x = np.concatenate([self.rest, x])
        n = x.size // self.frame
        pcm = np.clip(np.round(x[: n * self.frame] * 32768.0), -32768, 32767)
        pcm = pcm.astype(np.int16)
        for i in range(n):
            self.scores.append(self.score(pcm[i * self.frame : (i + 1) * self.frame]))
        self.rest = x[n * self.frame :]

    def all_scores(self) -> np.ndarray:
        return np.asarray(self.scores, np.float32)


class WebrtcStream(Int16FrameStream):
    """webrtcvad.Vad(mode) on `ms`-long int16 frames: score = 0/1."""

    def __init__(self, mode: int, ms: int = 30) -> None:
        import webrtcvad

        super().__init__(SR * ms // 1000)
        self.vad = webrtcvad.Vad(mode)

    def score(self, pcm: np.ndarray) -> float:
        return float(self.vad.is_speech(pcm.astype("<i2").tobytes(), SR))


class TenStream(Int16FrameStream):
    """ten_vad.TenVad(hop) on int16 frames: score = speech probability."""

    def __init__(self, hop: int = 256) -> None:
        from ten_vad import TenVad

        super().__init__(hop)
        self.vad = TenVad(hop, 0.5)

    def score(self, pcm: np.ndarray) -> float:
        prob, _ = self.vad.process(pcm)
        return float(prob)


class SileroStream:
    """diglett.engine.vad.StreamingVad: score = speech probability. `stock`: the
    one-frame-per-call silero_vad.onnx instead of the sequence export."""

    def __init__(self, stock: bool = False) -> None:
        from diglett.engine import vad

        session = None
        if stock:
            session = vad.load_session(vad.model_path(("silero_vad.onnx",)))
        elif vad._SESSION is not None and not vad._SESSION._sequence:
            session = vad.load_session(vad.model_path())
        self.v = vad.StreamingVad(history_s=1e6, session=session)
        self.frame = vad.FRAME_SAMPLES

    def push(self, x: np.ndarray) -> None:
        self.v.push(x)

    def all_scores(self) -> np.ndarray:
        return self.v.frame_probs(0, self.v.scored_samples)


def hysteresis(p: np.ndarray, on: float, off: float) -> np.ndarray:
    """Flags that switch on at p >= on and off at p < off."""
    out = np.zeros(p.size, bool)
    state = False
    for i, v in enumerate(p):
        state = v >= on if not state else v >= off
        out[i] = state
    return out


# Detector families: (name, stream factory) -> list of (config, flags(scores)).
def families(args):
    fams = [
        (
            "energy",
            EnergyStream,
            [(f"energy {g:.0f} dBFS", (lambda s, g=g: s >= g)) for g in (-55.0,)],
        ),
    ]
    for mode in (0, 1, 2, 3):
        fams.append(
            (
                f"webrtc{mode}",
                lambda mode=mode: WebrtcStream(mode, 30),
                [(f"webrtc mode {mode} (30 ms)", lambda s: s >= 0.5)],
            )
        )
    fams.append(
        (
            "silero",
            SileroStream,
            [(f"silero p>={t}", (lambda s, t=t: s >= t)) for t in (0.3, 0.5, 0.7)]
            + [("silero hyst 0.5/0.35", lambda s: hysteresis(s, 0.5, 0.35))]
            + [
                (f"silero p>=0.5 hop>={f}", (lambda s: s >= 0.5), f) for f in (0.3, 0.4)
            ],
        )
    )
    if not args.no_ten:
        fams.append(
            (
                "ten",
                lambda: TenStream(256),
                [(f"ten p>={t}", (lambda s, t=t: s >= t)) for t in (0.3, 0.5, 0.7)],
            )
        )
    return fams


# ---------------------------------------------------------------- scoring
def counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[tp, fn, fp, tn]."""
    return np.array(
        [
            np.sum(pred & truth),
            np.sum(~pred & truth),
            np.sum(pred & ~truth),
            np.sum(~pred & ~truth),
        ],
        np.int64,
    )


def rates(c: np.ndarray) -> dict:
    tp, fn, fp, tn = (float(v) for v in c)
    div = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "acc": div(tp + tn, tp + fn + fp + tn),
        "sp_rec": div(tp, tp + fn),
        "ns_prec": div(tn, tn + fn),
        "ns_rec": div(tn, tn + fp),
    }


def evaluate(flags, frame: int, x, item: Item, hop_frac: float, args, energy: bool):
    """(frame counts, hop counts) for detector flags on frames of `frame`."""
    n_t = item.truth.size
    centres = np.arange(n_t) * FRAME + FRAME // 2
    idx = centres // frame
    pred = np.zeros(n_t, bool)
    ok = idx < flags.size
    pred[ok] = flags[idx[ok]]
    fc = counts(pred, item.truth)
    n_h = item.n // HOP
    per = HOP // FRAME
    hop_truth = item.truth[: n_h * per].reshape(n_h, per).mean(1) >= 0.5
    if energy:
        hop_pred = np.array(
            [
                levels.has_speech(x[h * HOP : (h + 1) * HOP], args.gate_dbfs, 0.4)
                for h in range(n_h)
            ]
        )
    else:
        samp = np.zeros(n_h * HOP, bool)
        rep = np.repeat(flags, frame)[: n_h * HOP]
        samp[: rep.size] = rep
        # Scored samples only, as StreamingVad.speech_fraction does.
        scored = np.zeros(n_h * HOP, bool)
        scored[: min(n_h * HOP, flags.size * frame)] = True
        num = samp.reshape(n_h, HOP).sum(1)
        den = np.maximum(scored.reshape(n_h, HOP).sum(1), 1)
        hop_pred = num / den >= hop_frac
    return fc, counts(hop_pred, hop_truth)


def accuracy(items, args) -> dict:
    fams = families(args)
    res: dict = {}
    for ci, cond in enumerate(CONDITIONS):
        sigs = [
            render(it, cond, args.seed * 1000 + ci * 100 + k)
            for k, it in enumerate(items)
        ]
        for fam, factory, configs in fams:
            t0 = time.process_time()
            for it, x in zip(items, sigs):
                s = factory()
                s.push(x)
                scores = s.all_scores()
                for name, rule, *hop_frac in configs:
                    frac = hop_frac[0] if hop_frac else args.hop_frac
                    fc, hc = evaluate(
                        rule(scores), s.frame, x, it, frac, args, fam == "energy"
                    )
                    r = res.setdefault(name, {}).setdefault(
                        cond,
                        {"frame": np.zeros(4, np.int64), "hop": np.zeros(4, np.int64)},
                    )
                    r["frame"] += fc
                    r["hop"] += hc
            print(
                f"  {cond:9s} {fam:8s} {time.process_time() - t0:6.2f} s CPU",
                file=sys.stderr,
            )
    out = {}
    for name, by_cond in res.items():
        out[name] = {
            cond: {
                "frame": rates(v["frame"]),
                "hop": rates(v["hop"]),
                "frame_counts": v["frame"].tolist(),
                "hop_counts": v["hop"].tolist(),
            }
            for cond, v in by_cond.items()
        }
    return out


# ------------------------------------------------------------------- cost
def stream_cost(factory, x: np.ndarray, query, repeats: int = 3) -> float:
    """Least CPU ms per 0.5 s hop of streaming `x` in 0.1 s pushes."""
    best = float("inf")
    for _ in range(repeats):
        s = factory()
        t0 = time.thread_time()
        done = 0
        for i in range(0, x.size, PUSH):
            s.push(x[i : i + PUSH])
            if (i + PUSH) // HOP > done:
                done = (i + PUSH) // HOP
                query(s, (done - 1) * HOP, done * HOP)
        best = min(best, time.thread_time() - t0)
    return 1000.0 * best / (x.size / HOP)


def _q_fraction(s, start, end):
    s.v.speech_fraction(start, end)
    s.v.frame_flags(max(0, end - 24000), end)


def _q_none(s, start, end):
    pass


def _q_energy(s, start, end):
    pass


FRESH = r"""
import json, os, sys, time, resource
import numpy as np
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = (np.random.default_rng(0).standard_normal(8000) * 0.01).astype(np.float32)
r0 = rss(); t0 = time.perf_counter(); c0 = time.process_time()
kind = sys.argv[1]
if kind.startswith("silero"):
    from diglett.engine import vad
    names = ("silero_vad.onnx",) if kind == "silero-stock" else vad.MODEL_FILES
    vad.load_session(vad.model_path(names))
    d = vad.create(); d.push(x); d.speech_fraction(0, 8000)
elif kind.startswith("webrtc"):
    import webrtcvad
    d = webrtcvad.Vad(3)
    d.is_speech((x[:480] * 32767).astype("<i2").tobytes(), 16000)
elif kind.startswith("ten"):
    from ten_vad import TenVad
    d = TenVad(256, 0.5); d.process((x[:256] * 32767).astype(np.int16))
elif kind == "energy":
    from diglett.engine import levels
    levels.has_speech(x, -55.0, 0.4)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "rss_delta_mib": (rss() - r0) / 2**20,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fresh_cost(kind: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = []
    for _ in range(2):  # the second run has warm file caches
        out = subprocess.run(
            [sys.executable, "-c", FRESH, kind],
            cwd=ROOT,  # `-c` imports from the working directory
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs[-1]


def costs(items, args) -> dict:
    x = render(items[0], "pink15", 7)
    while x.size < args.cost_s * SR:
        x = np.concatenate([x, x])
    x = x[: int(args.cost_s * SR)]
    plans = [
        ("energy (20 ms)", EnergyStream, _q_energy, "energy"),
        ("webrtc mode 3 (30 ms)", lambda: WebrtcStream(3, 30), _q_none, "webrtc"),
        ("webrtc mode 3 (10 ms)", lambda: WebrtcStream(3, 10), _q_none, "webrtc"),
        ("silero sequence onnx (32 ms)", SileroStream, _q_fraction, "silero"),
        (
            "silero stock onnx (32 ms)",
            lambda: SileroStream(stock=True),
            _q_fraction,
            "silero-stock",
        ),
    ]
    if not args.no_ten:
        plans += [
            ("ten (256 = 16 ms)", lambda: TenStream(256), _q_none, "ten"),
            ("ten (160 = 10 ms)", lambda: TenStream(160), _q_none, "ten"),
        ]
    out = {}
    for name, factory, query, kind in plans:
        ms = stream_cost(factory, x, query)
        fresh = fresh_cost(kind)
        out[name] = {
            "cpu_ms_per_hop": ms,
            **{f"create_{k}": v for k, v in fresh.items()},
        }
        print(f"  cost {name}: {ms:.3f} ms/hop", file=sys.stderr)
    return out


# ----------------------------------------------------------------- report
def fmt(v: float) -> str:
    return "  nan" if v != v else f"{v:.3f}"


def report(acc: dict, cost: dict) -> dict:
    metrics = [("frame", k) for k in ("acc", "sp_rec", "ns_prec", "ns_rec")] + [
        ("hop", k) for k in ("acc", "sp_rec", "ns_prec", "ns_rec")
    ]
    head = "| detector | " + " | ".join(f"{a} {b}" for a, b in metrics) + " |"
    sep = "|---" * (len(metrics) + 1) + "|"
    for cond in CONDITIONS:
        print(f"\n### {cond}\n\n{head}\n{sep}")
        for name, by in acc.items():
            r = by[cond]
            print(f"| {name} | " + " | ".join(fmt(r[a][b]) for a, b in metrics) + " |")
    summary = {}
    print("\n### summary over conditions: mean / worst (condition)\n")
    print(head + "\n" + sep)
    for name, by in acc.items():
        cells, summary[name] = [], {}
        for a, b in metrics:
            vals = {c: by[c][a][b] for c in CONDITIONS}
            ok = {c: v for c, v in vals.items() if v == v}
            mean = float(np.mean(list(ok.values())))
            worst = min(ok, key=ok.get)
            summary[name][f"{a}_{b}"] = {
                "mean": mean,
                "worst": ok[worst],
                "worst_cond": worst,
            }
            cells.append(f"{mean:.3f} / {ok[worst]:.3f} ({worst})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### cost (CPU per 0.5 s hop, 0.1 s pushes, one thread; fresh process)\n")
    print(
        "| detector | CPU ms/hop | create+import wall ms | create CPU ms | RSS delta MiB |"
    )
    print("|---|---|---|---|---|")
    for name, c in cost.items():
        print(
            f"| {name} | {c['cpu_ms_per_hop']:.3f} | {1000 * c['create_wall_s']:.1f} | "
            f"{1000 * c['create_cpu_s']:.1f} | {c['create_rss_delta_mib']:.1f} |"
        )
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utterances", type=int, default=42)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hop-frac", type=float, default=0.5)
    ap.add_argument("--gate-dbfs", type=float, default=-55.0)
    ap.add_argument("--cost-s", type=float, default=30.0)
    ap.add_argument("--no-ten", action="store_true")
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--quick", action="store_true", help="14 utterances, 2 items")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.utterances, args.items = 14, 2
    items, info = build_items(args.utterances, args.items, args.seed)
    print(
        f"{len(info['utterances'])} utterances, {len(info['corpora'])} corpora, "
        f"{info['speech_s']:.0f} s speech in {info['total_s']:.0f} s per condition",
        file=sys.stderr,
    )
    acc = accuracy(items, args)
    cost = {} if args.no_cost else costs(items, args)
    summary = report(acc, cost)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "data": info,
                "conditions": CONDITIONS,
                "accuracy": acc,
                "summary": summary,
                "cost": cost,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
