#!/usr/bin/env python
"""Tune threshold, gate_dbfs and speech_min_frac on synthetic conversations.

Runs every conversation OFFLINE through the real `diglett.engine.session.SessionEngine`
(the exact per-session server logic): `enroll` + 0.1 s pcm_s16le frames +
`enroll_end` for A and B, `stream`, the conversation in 0.1 s frames, `end`;
every embedding job is computed with the real ECAPA model via
`diglett.model.embedder.Embedder`. The frames carry a simulated real-time clock.

Caching: the decision parameters never change a window's audio, only
whether a hop is embedded (gate) and how its scores are read (threshold).
So each conversation is first run once with the gate disabled
(gate_dbfs=-1000, speech_min_frac=0: every hop with audio is embedded), and
the window embeddings are stored by (conversation, seq) (also on disk, in
--cache-dir). For each (gate_dbfs, speech_min_frac) the engine is then run
again with those settings, answering its jobs from the cache (the window
length is checked); the hops it leaves unembedded are `silence`, the others
are re-decided for every threshold with the server's own
`cosine_scores` + `decide`. The chosen setting is finally re-run end to end
through the engine with its real threshold, and those labels are what is
reported (and checked against the fast path).

Split: TUNE = LS-19, LS-26, VCTK-p225, VCTK-p226; HELD-OUT = ARCTIC-clb,
VCTK-p227, VCTK-p228. Conversations: every ordered (A, B, C) of the split,
`--tune-per-triple` / `--held-out-per-triple` times, each from its own seeded
rng (see bench/conversations.py for how they are made). The grid is searched
on TUNE (pooled four-class frame accuracy, ties broken by merged accuracy);
HELD-OUT is scored only with the chosen values.

Baseline, the seed project's method, on the same held-out conversations and
enrollment embeddings: the stream is cut into 1/3 s segments (sample
boundaries round(k * 16000 / 3)), each embedded on its own; speaker 1 (A) is
checked first: cos(A) > 0.25 → A, elif cos(B) > 0.25 → B, else noise. The
seed had no silence class of its own, so it is given the same energy gate
as ours at the chosen values (`levels.has_speech(segment, gate_dbfs,
speech_min_frac)` false → silence), which isolates the effect of the
embedding/decision method. Labels are mapped onto the same 0.1 s frames.

The tuned "threshold" is the server's relative bar (`rel_threshold`: each
speaker's bar is that times its enrollment's self-score, see
diglett/engine/decision.py); with --absolute it is the one cosine threshold for
all speakers, with relative bars off. Enrollment sub-window embeddings are
cached by speaker and the digest of their audio.

Usage: .venv/bin/python -m bench.tune_decision [--quick] [--absolute] [--model-dir DIR]
Writes bench/results/tune_decision.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from bench import conversations as cv  # noqa: E402
from bench import metrics as mt  # noqa: E402
from diglett.engine import levels  # noqa: E402
from diglett.engine.decision import NOISE, SILENCE, cosine_scores, decide  # noqa: E402
from diglett.engine.decision import normalize  # noqa: E402
from diglett.engine.decision import speaker_threshold  # noqa: E402
from diglett.engine.session import (
    Close,
    EnrollJob,
    EnrollWindowJob,
    HopJob,
)  # noqa: E402
from diglett.engine.session import SessionEngine  # noqa: E402
from diglett.settings import SAMPLE_RATE, Settings  # noqa: E402

TUNE = ["LS-19", "LS-26", "VCTK-p225", "VCTK-p226"]
HELD_OUT = ["ARCTIC-clb", "VCTK-p227", "VCTK-p228"]
FRAME_SAMPLES = 1600  # 0.1 s per binary frame
# The seed project's method: silence by its -55 dBFS gate on 40 % of 20 ms
# frames, then cos > BASELINE_THRESHOLD, speaker 1 first.
SEED_GATE_DBFS = -55.0
SEED_MIN_FRAC = 0.4
BASELINE_THRESHOLD = 0.25
GATE_OFF = -1000.0
# The grid's "threshold" axis: the per-speaker relative bar (the server's
# default decision), or with --absolute one cosine for all (rel off).
KNOB = "rel_threshold"
DEFAULT_MODEL_DIR = ROOT.parent / "shared" / "models" / "spkrec-ecapa-voxceleb"


# --------------------------------------------------------------- the engine
def _frames(x: np.ndarray) -> list[bytes]:
    return [
        cv.to_s16_bytes(x[i : i + FRAME_SAMPLES])
        for i in range(0, x.size, FRAME_SAMPLES)
    ]


@dataclasses.dataclass
class Prepared:
    """A conversation with its wire frames, ready to replay."""

    key: str
    conv: cv.Conversation
    enroll_frames: dict[str, list[bytes]]
    stream_frames: list[bytes]


def prepare(key: str, conv: cv.Conversation) -> Prepared:
    return Prepared(
        key,
        conv,
        {s: _frames(conv.enroll[s]) for s in conv.speakers},
        _frames(conv.signal),
    )


def drive(p: Prepared, settings: Settings, embed_enroll, embed_hop):
    """Replay one conversation through a fresh SessionEngine.

    `embed_enroll(job)` / `embed_hop(job)` return the embedding for a job
    (hop jobs without a window get None). Returns (messages, engine).
    """
    eng = SessionEngine(settings)
    msgs: list[dict] = []
    t = 0.0

    def embed(job):
        if isinstance(job, (EnrollJob, EnrollWindowJob)):
            return embed_enroll(job)
        return embed_hop(job)

    def handle(actions) -> None:
        if hasattr(eng, "run"):  # the server's own completion path
            out, close = eng.run(actions, lambda jobs: [embed(j) for j in jobs])
            msgs.extend(out)
            if close is not None:
                msgs.append({"type": "_close", "code": close})
            return
        if hasattr(eng, "finish"):  # engines before the second look
            jobs = eng.jobs(actions)
            out, close = eng.finish(actions, [embed(j) for j in jobs])
            msgs.extend(out)
            if close is not None:
                msgs.append({"type": "_close", "code": close})
            return
        for a in actions:  # older engines: complete each job in order
            if isinstance(a, (EnrollJob, HopJob)):
                emb = None if a.audio is None else embed(a)
                msgs.append(eng.complete(a, emb))
            elif isinstance(a, Close):
                msgs.append({"type": "_close", "code": a.code})
            elif isinstance(a, dict):
                msgs.append(a)

    def send(frames: list[bytes]) -> None:
        nonlocal t
        for f in frames:
            t += len(f) / 2 / SAMPLE_RATE  # simulated real-time clock
            handle(eng.on_binary(f, t))

    for name in p.conv.speakers:
        handle(eng.on_text(json.dumps({"type": "enroll", "speaker": name}), t))
        send(p.enroll_frames[name])
        handle(eng.on_text(json.dumps({"type": "enroll_end"}), t))
    handle(eng.on_text(json.dumps({"type": "stream"}), t))
    send(p.stream_frames)
    handle(eng.on_text(json.dumps({"type": "end"}), t))
    errors = [m for m in msgs if m.get("type") == "error"]
    if errors:
        raise RuntimeError(f"{p.key}: engine errors {errors}")
    return msgs, eng


def label_msgs(msgs: list[dict]) -> list[dict]:
    return [m for m in msgs if m.get("type") == "label"]


# ---------------------------------------------------------------- embedding
def digest(x: np.ndarray) -> int:
    """A 63-bit fingerprint of an audio array (its exact samples)."""
    h = hashlib.blake2b(np.ascontiguousarray(x, np.float32).tobytes(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


class Cache:
    """Embeddings of one conversation: enrollments, hop windows, baseline.

    Each embedding is stored with the fingerprint of the exact audio it was
    computed from, so a change in the engine (windowing, resampling) is
    detected and only the affected windows are embedded again.
    """

    def __init__(self) -> None:
        self.enroll: dict[str, np.ndarray] = {}
        self.enroll_digest: dict[str, int] = {}
        self.hops: dict[int, np.ndarray] = {}
        self.hop_digest: dict[int, int] = {}
        self.baseline: np.ndarray | None = None

    def save(self, path: Path) -> None:
        seqs = sorted(self.hops)
        names = sorted(self.enroll)
        arrays = {
            "enroll_names": np.array(names),
            "enroll_digest": np.array(
                [self.enroll_digest[k] for k in names], dtype=np.int64
            ),
            "enroll": np.stack([self.enroll[k] for k in names]),
            "seqs": np.array(seqs, dtype=np.int64),
            "hop_digest": np.array([self.hop_digest[q] for q in seqs], dtype=np.int64),
            "hops": (
                np.stack([self.hops[q] for q in seqs])
                if seqs
                else np.zeros((0, 192), np.float32)
            ),
        }
        if self.baseline is not None:
            arrays["baseline"] = self.baseline
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Cache":
        c = cls()
        try:
            z = np.load(path)
            for k, d, e in zip(z["enroll_names"], z["enroll_digest"], z["enroll"]):
                c.enroll[str(k)], c.enroll_digest[str(k)] = e, int(d)
            for q, d, e in zip(z["seqs"], z["hop_digest"], z["hops"]):
                c.hops[int(q)], c.hop_digest[int(q)] = e, int(d)
            if "baseline" in z.files:
                c.baseline = z["baseline"]
        except (OSError, KeyError, ValueError):
            return cls()  # unreadable or from an older layout: start afresh
        return c


def enroll_key(job: EnrollJob | EnrollWindowJob) -> str:
    """Cache key of an enrollment job: the speaker, or speaker#digest of a window."""
    if isinstance(job, EnrollWindowJob):
        return f"{job.speaker}#{digest(job.audio)}"
    return job.speaker


def cache_path(cache_dir: Path, p: Prepared, settings: Settings, model_dir) -> Path:
    h = hashlib.sha1()
    h.update(p.conv.signal.tobytes())
    for s in p.conv.speakers:
        h.update(s.encode())
        h.update(p.conv.enroll[s].tobytes())
    h.update(f"{settings.window_s}/{settings.hop_s}/{model_dir}".encode())
    return cache_dir / f"{p.key}-{h.hexdigest()[:16]}.npz"


def baseline_segments(n: int) -> list[tuple[int, int]]:
    """The seed's 1/3 s segments of an n-sample stream."""
    bounds, k = [], 0
    while True:
        s = int(round(k * SAMPLE_RATE / 3))
        if s >= n:
            break
        bounds.append((s, min(n, int(round((k + 1) * SAMPLE_RATE / 3)))))
        k += 1
    return bounds


def fill_caches(
    preps: list[Prepared],
    base: Settings,
    embedder,
    cache_dir: Path,
    model_dir,
    baseline_keys: set[str],
) -> tuple[dict[str, Cache], float, int]:
    """Embeddings for every conversation, from disk where still valid.

    Each conversation is replayed through the engine with the gate off; the
    enrollment and window audio it produces is compared (by fingerprint) with
    the cache, and whatever is missing or changed is embedded (windows
    batched) and saved, conversation by conversation, so an interrupted run
    resumes where it stopped.
    """
    caches: dict[str, Cache] = {}
    collect = dataclasses.replace(base, gate_dbfs=GATE_OFF, speech_min_frac=0.0)
    dummy = np.zeros(192, dtype=np.float32)
    embed_s, n_emb = 0.0, 0
    for i, p in enumerate(preps):
        path = cache_path(cache_dir, p, base, model_dir)
        c = Cache.load(path) if path.is_file() else Cache()
        todo_enroll, todo_hops, todo_base = [], [], []

        def on_enroll(job, c=c, todo=todo_enroll):
            d = digest(job.audio)
            if c.enroll_digest.get(enroll_key(job)) != d:
                todo.append((enroll_key(job), d, job.audio))
            return dummy

        def on_hop(job, c=c, todo=todo_hops):
            d = digest(job.window)
            if c.hop_digest.get(job.seq) != d:
                todo.append((job.seq, d, job.window))
            return dummy

        drive(p, collect, on_enroll, on_hop)
        if p.key in baseline_keys and c.baseline is None:
            todo_base = [
                p.conv.signal[s:e] for s, e in baseline_segments(p.conv.signal.size)
            ]
        caches[p.key] = c
        n = len(todo_enroll) + len(todo_hops) + len(todo_base)
        if not n:
            continue
        t0 = time.perf_counter()
        if todo_enroll:
            embs = embedder.embed([a for _, _, a in todo_enroll])
            for (name, d, _), e in zip(todo_enroll, embs):
                c.enroll[name], c.enroll_digest[name] = e, d
        if todo_hops:
            embs = embedder.embed([w for _, _, w in todo_hops])
            for (seq, d, _), e in zip(todo_hops, embs):
                c.hops[seq], c.hop_digest[seq] = e, d
        if todo_base:
            c.baseline = np.stack(embedder.embed(todo_base))
        dt = time.perf_counter() - t0
        embed_s += dt
        n_emb += n
        c.save(path)
        print(
            f"  [{i + 1}/{len(preps)}] {p.key}: {n} embeddings in {dt:.1f} s",
            flush=True,
        )
    return caches, embed_s, n_emb


def cached_embedders(c: Cache):
    def on_enroll(job):
        key = enroll_key(job)
        if c.enroll_digest.get(key) != digest(job.audio):
            raise AssertionError(f"enrollment {key}: audio not in the cache")
        return c.enroll[key]

    def on_hop(job):
        if c.hop_digest.get(job.seq) != digest(job.window):
            raise AssertionError(f"hop {job.seq}: window not in the cache")
        return c.hops[job.seq]

    return on_enroll, on_hop


# ------------------------------------------------------------------- scoring
@dataclasses.dataclass
class Evaluated:
    """Truth frames of one conversation and the frame → hop mapping."""

    prep: Prepared
    table: mt.FrameTable
    frame_hop: np.ndarray  # hop index of each frame
    scores: list[dict[str, float] | None]  # per hop, None when no window
    self_scores: dict[str, float | None]  # per enrolled speaker
    baseline_frame_seg: np.ndarray | None = None


def evaluate_setup(p: Prepared, c: Cache, base: Settings) -> Evaluated:
    """Engine run with the gate off: hop layout and every hop's scores."""
    collect = dataclasses.replace(base, gate_dbfs=GATE_OFF, speech_min_frac=0.0)
    msgs, eng = drive(p, collect, *cached_embedders(c))
    labels = label_msgs(msgs)
    refs = {k: v for k, v in eng.enrollments.items() if v is not None}
    scores = [
        cosine_scores(c.hops[m["seq"]], refs) if m["seq"] in c.hops else None
        for m in labels
    ]
    table = mt.frame_table(
        p.conv.truth, labels, p.conv.speakers, duration_s=p.conv.duration_s
    )
    ends = np.array([m["end_s"] for m in labels])
    frame_hop = np.searchsorted(ends, table.centres, side="right")
    return Evaluated(p, table, frame_hop, scores, dict(eng.self_scores))


def hop_speech(ev: Evaluated, c: Cache, settings: Settings) -> list[bool]:
    """Which hops the engine embeds under `settings` (its gate)."""
    msgs, _ = drive(ev.prep, settings, *cached_embedders(c))
    return ["scores" in m for m in label_msgs(msgs)]


def hop_classes(ev: Evaluated, speech: list[bool], threshold: float) -> np.ndarray:
    """Hop classes with `threshold` as the tuned knob (see KNOB)."""
    speakers = ev.prep.conv.speakers
    rel, absolute = (threshold, 0.0) if KNOB == "rel_threshold" else (0.0, threshold)
    bars = {
        n: speaker_threshold(ev.self_scores.get(n), rel, absolute) for n in speakers
    }
    out = np.empty(len(speech), dtype=int)
    for i, (sp, sc) in enumerate(zip(speech, ev.scores)):
        lab = decide(sc, bars) if sp and sc is not None else SILENCE
        out[i] = mt.role_of(lab, speakers)
    return out


def fast_score(ev: Evaluated, hop_cls: np.ndarray) -> mt.Score:
    ft = dataclasses.replace(ev.table, pred=hop_cls[ev.frame_hop])
    return mt.score_table(ft)


def baseline_labels(
    p: Prepared, c: Cache, gate_dbfs: float, min_frac: float
) -> list[tuple[float, float, str]]:
    a, b = p.conv.speakers
    ra, rb = normalize(c.enroll[a]), normalize(c.enroll[b])
    out = []
    for (s, e), emb in zip(baseline_segments(p.conv.signal.size), c.baseline):
        seg = p.conv.signal[s:e]
        if not levels.has_speech(seg, gate_dbfs, min_frac):
            lab = SILENCE
        else:
            en = normalize(emb)
            if float(np.dot(en, ra)) > BASELINE_THRESHOLD:
                lab = a
            elif float(np.dot(en, rb)) > BASELINE_THRESHOLD:
                lab = b
            else:
                lab = NOISE
        out.append((s / SAMPLE_RATE, e / SAMPLE_RATE, lab))
    return out


def onset_profile(pairs) -> dict[str, dict]:
    """Accuracy on speech frames by time since the true segment began.

    `pairs` yields (truth track, FrameTable). Shows how long after a turn
    starts the labels catch up (the engine looks back window_s seconds).
    """
    bins = [(0.25, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 99.0)]
    ok = Counter()
    n = Counter()
    for truth, ft in pairs:
        starts = np.array([s for s, _, _ in truth])
        idx = np.searchsorted(starts, ft.centres, side="right") - 1
        since = ft.centres - starts[idx]
        for lo, hi in bins:
            m = ft.scored & (ft.truth <= 2) & (since >= lo) & (since < hi)
            n[(lo, hi)] += int(m.sum())
            ok[(lo, hi)] += int((ft.pred[m] == ft.truth[m]).sum())
    return {
        f"{lo:g}-{hi:g}s" if hi < 99 else f">={lo:g}s": {
            "frames": n[(lo, hi)],
            "accuracy": ok[(lo, hi)] / n[(lo, hi)] if n[(lo, hi)] else None,
        }
        for lo, hi in bins
    }


# ------------------------------------------------------------------- main
def frange(spec: str) -> list[float]:
    lo, hi, step = (float(v) for v in spec.split(":"))
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def build_split(utts, speakers, per_triple, seed, tag, n_turns):
    preps = []
    for ti, (a, b, c) in enumerate(cv.ordered_triples(speakers)):
        for r in range(per_triple):
            rng = np.random.default_rng([seed, len(tag), ti, r])
            conv = cv.build_conversation(rng, utts, a, b, c, n_turns=n_turns)
            preps.append(prepare(f"{tag}{ti:02d}{r}-{a}-{b}-{c}", conv))
    return preps


def load_embedder(model_dir: Path, savedir: Path):
    from speechbrain.inference.speaker import EncoderClassifier

    from diglett.model.embedder import Embedder

    enc = EncoderClassifier.from_hparams(
        source=str(model_dir),
        savedir=str(savedir),
        overrides={"pretrained_path": str(model_dir)},
        run_opts={"device": "cpu"},
    )
    return Embedder(enc.eval(), "cpu", max_batch=32)


def pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speakers-dir", default=str(cv.DEFAULT_SPEAKERS_DIR))
    ap.add_argument(
        "--model-dir",
        default=os.environ.get("DIGLETT_MODEL_DIR") or str(DEFAULT_MODEL_DIR),
    )
    ap.add_argument("--cache-dir", default="/tmp/diglett_bench_cache")
    ap.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "tune_decision.json")
    )
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--n-turns", type=int, default=14)
    ap.add_argument("--tune-per-triple", type=int, default=1)
    ap.add_argument("--held-out-per-triple", type=int, default=2)
    ap.add_argument("--thresholds", default="0.05:0.6:0.05")
    ap.add_argument("--gates", default="-65:-35:5")
    ap.add_argument("--fracs", default="0.1:0.8:0.1")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: keep)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument(
        "--absolute",
        action="store_true",
        help="tune the absolute threshold with rel_threshold off (the old decision)",
    )
    args = ap.parse_args(argv)
    global KNOB
    KNOB = "threshold" if args.absolute else "rel_threshold"

    t_start = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = Settings(max_rate=20.0)
    if args.absolute:
        base = dataclasses.replace(base, rel_threshold=0.0)
    thresholds = frange(args.thresholds)
    gates = frange(args.gates)
    fracs = frange(args.fracs)

    utts = cv.load_speakers(args.speakers_dir)
    tune = build_split(utts, TUNE, args.tune_per_triple, args.seed, "T", args.n_turns)
    held = build_split(
        utts, HELD_OUT, args.held_out_per_triple, args.seed, "H", args.n_turns
    )
    if args.quick:
        tune, held = tune[:3], held[:2]
        thresholds, gates, fracs = thresholds[::3], gates[::2], fracs[::2]
    audio_s = sum(p.conv.duration_s for p in tune + held)
    print(
        f"{len(tune)} TUNE + {len(held)} HELD-OUT conversations, "
        f"{audio_s / 60:.1f} min of audio; grid {len(thresholds)} thresholds x "
        f"{len(gates)} gates x {len(fracs)} speech_min_frac",
        flush=True,
    )

    model_dir = Path(args.model_dir)
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    embedder = load_embedder(model_dir, cache_dir / "sb_savedir")
    load_s = time.perf_counter() - t0
    caches, embed_s, n_emb = fill_caches(
        tune + held, base, embedder, cache_dir, model_dir, {p.key for p in held}
    )
    print(
        f"model loaded in {load_s:.1f} s; {n_emb} new embeddings in {embed_s:.1f} s",
        flush=True,
    )

    # ---- grid on TUNE (fast path: cached embeddings, engine for the gate)
    t0 = time.perf_counter()
    evs = {p.key: evaluate_setup(p, caches[p.key], base) for p in tune}
    grid = []
    for g in gates:
        for f in fracs:
            s = dataclasses.replace(base, gate_dbfs=g, speech_min_frac=f)
            speech = {p.key: hop_speech(evs[p.key], caches[p.key], s) for p in tune}
            for thr in thresholds:
                tot = mt.total(
                    fast_score(evs[p.key], hop_classes(evs[p.key], speech[p.key], thr))
                    for p in tune
                )
                grid.append(
                    {
                        "threshold": thr,
                        "gate_dbfs": g,
                        "speech_min_frac": f,
                        "accuracy": tot.accuracy,
                        "merged_accuracy": tot.merged_accuracy,
                    }
                )
    grid_s = time.perf_counter() - t0
    grid.sort(key=lambda r: (-r["accuracy"], -r["merged_accuracy"]))
    best = grid[0]
    chosen = dataclasses.replace(
        base,
        **{KNOB: best["threshold"]},
        gate_dbfs=best["gate_dbfs"],
        speech_min_frac=best["speech_min_frac"],
    )
    print(f"grid of {len(grid)} points on TUNE in {grid_s:.1f} s", flush=True)

    # ---- official numbers: full engine runs with the real settings
    def run_ours(preps, settings):
        per, pairs, warn = [], [], Counter()
        for p in preps:
            msgs, _ = drive(p, settings, *cached_embedders(caches[p.key]))
            for m in msgs:
                if m.get("type") == "enrolled":
                    warn.update(m["warnings"] or ["none"])
            ft = mt.frame_table(
                p.conv.truth,
                label_msgs(msgs),
                p.conv.speakers,
                duration_s=p.conv.duration_s,
            )
            per.append((p.key, mt.score_table(ft)))
            pairs.append((p.conv.truth, ft))
        return per, pairs, warn

    def run_baseline(preps, gate, frac):
        per, pairs = [], []
        for p in preps:
            labels = baseline_labels(p, caches[p.key], gate, frac)
            ft = mt.frame_table(
                p.conv.truth, labels, p.conv.speakers, duration_s=p.conv.duration_s
            )
            per.append((p.key, mt.score_table(ft)))
            pairs.append((p.conv.truth, ft))
        return per, pairs

    tune_ours, _, _ = run_ours(tune, chosen)
    tune_total = mt.total(s for _, s in tune_ours)
    if abs(tune_total.accuracy - best["accuracy"]) > 1e-12:
        raise AssertionError(
            f"fast path {best['accuracy']} != engine {tune_total.accuracy}"
        )
    defaults = Settings()
    held_ours, held_pairs, warnings = run_ours(held, chosen)
    held_def, _, _ = run_ours(held, defaults)
    held_base, base_pairs = run_baseline(held, chosen.gate_dbfs, chosen.speech_min_frac)
    tot_ours = mt.total(s for _, s in held_ours)
    tot_def = mt.total(s for _, s in held_def)
    tot_base = mt.total(s for _, s in held_base)

    # Sensitivity only (never used for the choice): held-out accuracy for
    # each threshold at the chosen gate and speech_min_frac.
    held_curve = []
    for p in held:
        evs[p.key] = evaluate_setup(p, caches[p.key], base)
    speech = {p.key: hop_speech(evs[p.key], caches[p.key], chosen) for p in held}
    for thr in thresholds:
        sc = mt.total(
            fast_score(evs[p.key], hop_classes(evs[p.key], speech[p.key], thr))
            for p in held
        )
        held_curve.append(
            {
                "threshold": thr,
                "accuracy": sc.accuracy,
                "merged_accuracy": sc.merged_accuracy,
            }
        )

    # ---- report
    print()
    print("Top of the TUNE grid (pooled frame accuracy, 0.25 s collar):")
    print(" threshold  gate_dbfs  min_frac   4-class   merged")
    for r in grid[:10]:
        print(
            f"   {r['threshold']:6.2f}   {r['gate_dbfs']:7.1f}   {r['speech_min_frac']:6.2f}"
            f"   {pct(r['accuracy'])}  {pct(r['merged_accuracy'])}"
        )
    marginals = {}
    for key in ("threshold", "gate_dbfs", "speech_min_frac"):
        best_of = {}
        for r in grid:
            v = r[key]
            if v not in best_of or r["accuracy"] > best_of[v]["accuracy"]:
                best_of[v] = r
        marginals[key] = [best_of[v] for v in sorted(best_of)]
        print(f"Best TUNE 4-class accuracy for each {key}:")
        print(
            "  "
            + "  ".join(
                f"{v['%s' % key]:g}: {100 * v['accuracy']:.1f}" for v in marginals[key]
            )
        )
    print()
    print(
        f"CHOSEN: {KNOB}={getattr(chosen, KNOB):g}  gate_dbfs={chosen.gate_dbfs:g}  "
        f"speech_min_frac={chosen.speech_min_frac:g}  "
        f"(TUNE 4-class {pct(tune_total.accuracy)}, merged {pct(tune_total.merged_accuracy)})"
    )
    print()
    print(
        f"HELD-OUT ({len(held)} conversations, {tot_ours.frames} scored 0.1 s frames):"
    )
    print(" method                                          4-class   merged")
    rows = [
        (
            f"ours, chosen ({KNOB} {getattr(chosen, KNOB):g}, {chosen.gate_dbfs:g} dBFS, "
            f"{chosen.speech_min_frac:g})",
            tot_ours,
        ),
        (
            f"ours, current defaults ({KNOB} {getattr(defaults, KNOB):g}, "
            f"{defaults.gate_dbfs:g} dBFS, {defaults.speech_min_frac:g})",
            tot_def,
        ),
        (
            "baseline: seed 1/3 s, thr 0.25, spk1 first, same gate",
            tot_base,
        ),
    ]
    for name, sc in rows:
        print(f" {name:46s}  {pct(sc.accuracy)}  {pct(sc.merged_accuracy)}")
    print()
    print("Confusion, ours (chosen), held-out (rows truth, columns prediction):")
    print(mt.format_confusion(tot_ours.confusion))
    print()
    print("Confusion, baseline, held-out:")
    print(mt.format_confusion(tot_base.confusion))
    print()
    on_ours = onset_profile(held_pairs)
    on_base = onset_profile(base_pairs)
    print("Speech-frame accuracy by time since the true segment began (held-out):")
    for k in on_ours:
        a, b = on_ours[k], on_base[k]
        print(
            f"  {k:>9s}: ours {pct(a['accuracy'] or 0)}  baseline "
            f"{pct(b['accuracy'] or 0)}  ({a['frames']} frames)"
        )
    print()
    print("Per held-out conversation (ours / baseline, 4-class):")
    for (k, s), (_, bs) in zip(held_ours, held_base):
        print(f"  {k:42s} {pct(s.accuracy)} / {pct(bs.accuracy)}")
    print(
        "HELD-OUT 4-class accuracy by threshold at the chosen gate/min_frac "
        "(sensitivity only, not used for the choice):"
    )
    print(
        "  "
        + "  ".join(
            f"{r['threshold']:g}: {100 * r['accuracy']:.1f}" for r in held_curve
        )
    )
    print(f"Enrollment warnings seen (held-out): {dict(warnings)}")
    total_s = time.perf_counter() - t_start
    print(f"\nTotal run time {total_s:.1f} s (embedding {embed_s:.1f} s).")

    result = {
        "split": {"tune": TUNE, "held_out": HELD_OUT},
        "conversations": {
            "tune": len(tune),
            "held_out": len(held),
            "audio_min": audio_s / 60,
            "n_turns": args.n_turns,
            "seed": args.seed,
        },
        "scoring": {"frame_s": 0.1, "collar_s": 0.25, "classes": list(mt.CLASSES)},
        "grid": {
            "thresholds": thresholds,
            "gates_dbfs": gates,
            "speech_min_fracs": fracs,
            "top": grid[:20],
            "best_per_value": marginals,
        },
        "chosen": {
            "knob": KNOB,
            "threshold": chosen.threshold,
            "rel_threshold": chosen.rel_threshold,
            "gate_dbfs": chosen.gate_dbfs,
            "speech_min_frac": chosen.speech_min_frac,
            "tune": tune_total.as_dict(),
        },
        "held_out": {
            "ours_chosen": tot_ours.as_dict(),
            "ours_current_defaults": {
                "threshold": defaults.threshold,
                "rel_threshold": defaults.rel_threshold,
                "gate_dbfs": defaults.gate_dbfs,
                "speech_min_frac": defaults.speech_min_frac,
                **tot_def.as_dict(),
            },
            "baseline": {
                "method": "seed: 1/3 s segments, cosine > 0.25, speaker 1 first; "
                "silence by levels.has_speech at the chosen gate and speech_min_frac",
                **tot_base.as_dict(),
            },
            "per_conversation": [
                {"key": k, "ours": s.accuracy, "baseline": bs.accuracy}
                for (k, s), (_, bs) in zip(held_ours, held_base)
            ],
            "onset_profile": {"ours": on_ours, "baseline": on_base},
            "threshold_sensitivity_not_used_for_choice": held_curve,
            "enrollment_warnings": dict(warnings),
        },
        "runtime_s": {
            "total": total_s,
            "model_load": load_s,
            "embedding": embed_s,
            "new_embeddings": n_emb,
            "grid": grid_s,
        },
    }
    out = Path(args.out)
    if not args.quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
