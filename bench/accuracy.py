#!/usr/bin/env python
"""Accuracy of the live server on two-speaker conversations, against the seed method.

Builds conversations from a folder of real speech (`manifest.csv` format, see
bench/conversations.py): 5 s enrollments of A and B, alternating 1.5-4 s
turns from unseen utterances, turns by an unenrolled third speaker C (truth
`noise`), pauses over a faint noise floor, varied loudness. By default the
HELD-OUT split of bench/tune_decision.py (ARCTIC-clb, VCTK-p227, VCTK-p228;
every ordered (A, B, C), twice), so the numbers are on speakers the defaults
were not tuned on.

Each conversation goes through the server over the real protocol, in a
session of the project's client (bench/harness.py): connect,
`enroll` + 0.5 s pcm_s16le frames + `enroll_end` for A and B, `stream`, the
conversation, `end`. By default the client sends as fast as the server
answers (at most `--ahead` hops unanswered); `--realtime` paces the frames
at 1x and measures label latency on the client. Without `--url` it starts
the app itself (bench/harness.py: a new local Ray instance, free port, the
model from $DIGLETT_MODEL_DIR or ../shared/models); `DIGLETT_*` variables
reach it.

Reported, pooled over the conversations (0.1 s frames, 0.25 s collar around
true changes, bench/metrics.py):
- four-class (A, B, noise, silence) and merged (noise = silence) frame
  accuracy, and the confusion matrix;
- the EER of window-vs-enrollment trials: every label with `scores` whose
  window (the `window_s` ending at the hop's end, or `lookahead_s` after it
  when the server announces look-ahead in `ready`) holds one true talker
  (A, B or C, at least half the window) is a target trial for its own
  speaker and a non-target one for the other(s);
- the same for the seed project's method on the same audio: 1/3 s segments
  (boundaries round(k * 16000 / 3)), each and each enrollment clip embedded
  by the server's `POST /v1/embeddings`; speaker 1 (A) checked first:
  cos(A) > 0.25 → A, elif cos(B) > 0.25 → B, else noise; silence from the
  same energy gate as ours (the seed had none). Its EER uses its segments.
Writes `accuracy.json`, `accuracy.md` (the README table) and one PNG per
conversation (truth / ours / seed / level) under `--out-dir`.

    .venv/bin/python -m bench.accuracy            # held-out split, ~5 min on 2 CPUs
    .venv/bin/python -m bench.accuracy --url ws://HOST:8000/v1/stream --token T
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as futures
import hashlib
import io
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

from bench import conversations as cv
from bench import devset
from bench import harness as hn
from bench import metrics as mt
from bench import tune_decision as td
from bench.eer import eer
from bench.harness import ROOT, Server
from diglett.settings import SAMPLE_RATE, Settings

FRAME_S = 0.5  # audio per binary frame
CLASS_COLORS = {"A": "tab:blue", "B": "tab:orange", "noise": "tab:red"}


# ------------------------------------------------------------- the protocol
def stream_conversation(
    srv: Server,
    conv: cv.Conversation,
    *,
    realtime: bool = False,
    ahead: int = 8,
    timeout: float = 120.0,
) -> dict:
    """One conversation through a session of the project's client.

    Result: `ready`, `enrolled` (by speaker), `labels` (in order), `summary`,
    `close_code` and `client_latency_s` (per label: from sending the frame
    holding the hop's last sample to receiving the label).
    """
    return asyncio.run(_converse(srv, conv, realtime, ahead, timeout))


async def _converse(
    srv: Server, conv: cv.Conversation, realtime: bool, ahead: int, timeout: float
) -> dict:
    out: dict = {"enrolled": {}, "labels": [], "client_latency_s": []}
    clock = hn.Clock()
    errors: list[str] = []

    def on_label(msg: dict) -> None:
        out["labels"].append(msg)
        lag = clock.label(msg, time.monotonic())
        if lag is not None:
            out["client_latency_s"].append(lag)

    conn = await hn.connect(srv, on_label, errors.append)
    try:
        out["ready"] = conn.ready
        clock.hop_samples = int(round(conn.ready["hop_s"] * SAMPLE_RATE))
        n = int(round(FRAME_S * SAMPLE_RATE))
        for name in conv.speakers:
            out["enrolled"][name] = await hn.enroll(
                conn, name, conv.enroll[name], n, timeout
            )
        await conn.send_json({"type": "stream"})
        await hn.stream(
            conn,
            conv.signal,
            n,
            speed=1.0 if realtime else 0.0,  # fast: as the server answers
            clock=clock,
            ahead=None if realtime else ahead,
            timeout=timeout,
        )
        out["summary"] = await hn.finish(conn, timeout)
        await asyncio.wait_for(conn.closed.wait(), timeout)  # the close after it
        out["close_code"] = conn.close_code
    finally:
        await conn.close()
    if errors:
        raise RuntimeError(errors[0])
    return out


# ---------------------------------------------------------- seed's baseline
class EmbeddingClient:
    """`POST /v1/embeddings` with an on-disk cache keyed by the audio."""

    def __init__(self, base: str, token: str, cache_dir: Path, tag: str):
        self.base, self.token = base, token
        self.path = cache_dir / f"accuracy-embeddings-{tag}.npz"
        self.cache: dict[str, np.ndarray] = {}
        if self.path.is_file():
            z = np.load(self.path)
            self.cache = {k: z[k] for k in z.files}
        self.new = 0

    @staticmethod
    def key(x: np.ndarray) -> str:
        return hashlib.blake2b(
            np.ascontiguousarray(x, np.float32).tobytes(), digest_size=12
        ).hexdigest()

    def _post(self, x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        sf.write(buf, x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        req = urllib.request.Request(
            self.base + "/v1/embeddings",
            data=buf.getvalue(),
            headers={"Content-Type": "audio/wav"},
        )
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=120) as r:
            return np.array(json.loads(r.read())["embedding"], dtype=np.float32)

    def embed(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        keys = [self.key(x) for x in xs]
        todo = {k: x for k, x in zip(keys, xs) if k not in self.cache}
        if todo:
            with futures.ThreadPoolExecutor(4) as pool:
                embs = pool.map(self._post, todo.values())
                self.cache.update(zip(todo, embs))
            self.new += len(todo)
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(tmp, **self.cache)
            os.replace(tmp, self.path)
        return [self.cache[k] for k in keys]


def seed_labels(conv: cv.Conversation, client: EmbeddingClient):
    """The seed method's labels and its (segment, scores) for the EER."""
    bounds = td.baseline_segments(conv.signal.size)
    c = td.Cache()
    for name, e in zip(
        conv.speakers, client.embed([conv.enroll[n] for n in conv.speakers])
    ):
        c.enroll[name] = e
    c.baseline = np.stack(client.embed([conv.signal[a:b] for a, b in bounds]))
    prep = td.Prepared("", conv, {}, [])
    labels = td.baseline_labels(prep, c, td.SEED_GATE_DBFS, td.SEED_MIN_FRAC)
    refs = [c.enroll[n] / np.linalg.norm(c.enroll[n]) for n in conv.speakers]
    embs = c.baseline / np.linalg.norm(c.baseline, axis=1, keepdims=True)
    scores = [
        (
            {n: float(e @ r) for n, r in zip(conv.speakers, refs)}
            if lab != "silence"
            else None
        )
        for e, (_, _, lab) in zip(embs, labels)
    ]
    return labels, scores


# ------------------------------------------------------------------ trials
def window_truth(truth, start: float, end: float) -> str | None:
    """The one talker (A/B name or `noise`) of [start, end), or None.

    The window's 0.1 s frames other than silence must all be that talker's,
    and cover at least half the window.
    """
    centres = np.arange(start + 0.05, end - 1e-9, 0.1)
    labs = [x for x in mt.labels_at(truth, centres) if x not in (None, "silence")]
    if not labs or len(set(labs)) > 1 or len(labs) < 0.5 * len(centres):
        return None
    return labs[0]


def trials(conv: cv.Conversation, windows) -> tuple[list[float], list[float]]:
    """Target and non-target scores of (start_s, end_s, scores) windows."""
    tgt, non = [], []
    for start, end, scores in windows:
        if not scores:
            continue
        who = window_truth(conv.truth, start, end)
        if who is None:
            continue
        for name, v in scores.items():
            (tgt if name == who else non).append(v)
    return tgt, non


def eer_of(tgt: list[float], non: list[float]) -> dict:
    if not tgt or not non:
        return {"eer": None, "threshold": None, "target": len(tgt), "nontarget": 0}
    rate, thr = eer(np.array(tgt), np.array(non))
    return {"eer": rate, "threshold": thr, "target": len(tgt), "nontarget": len(non)}


# ------------------------------------------------------------------ picture
def picture(path: Path, conv: cv.Conversation, ours, seed, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def role(lab: str) -> str:
        return {conv.a: "A", conv.b: "B"}.get(lab, lab)

    fig, (ax, lv) = plt.subplots(
        2, 1, figsize=(10, 2.8), sharex=True, gridspec_kw={"height_ratios": [1.3, 1]}
    )
    rows = [("truth", conv.truth), ("ours", ours), ("seed", seed)]
    for y, (name, segs) in enumerate(rows):
        for s, e, lab in (mt._seg(x) for x in segs):
            color = CLASS_COLORS.get(role(lab))
            if color:
                ax.broken_barh([(s, e - s)], (2 - y - 0.4, 0.8), color=color, lw=0)
    ax.set_yticks([2, 1, 0], [r[0] for r in rows])
    ax.set_ylim(-0.6, 2.6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CLASS_COLORS.values()]
    ax.legend(
        handles,
        [f"A {conv.a}", f"B {conv.b}", f"noise ({conv.c})"],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
        fontsize=7,
        ncol=3,
    )
    ax.set_title(title, fontsize=8, loc="left")
    db = cv.frame_dbfs(conv.signal)
    lv.plot(np.arange(db.size) * 0.02, db, lw=0.5, color="0.4")
    lv.set_ylim(-80, 0)
    lv.set_ylabel("dBFS", fontsize=8)
    lv.set_xlabel("time (s); white: silence", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# -------------------------------------------------------------------- report
def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def markdown(res: dict) -> str:
    rows = [
        "| method | 4-class | merged | EER |",
        "|---|---|---|---|",
    ]
    st = res.get("settings", {})
    info = res.get("server", {}).get("info", {})
    ours = (
        f"ours, live server (rel_threshold {st.get('rel_threshold', '?')}, "
        f"look-ahead {info.get('lookahead_s', 0.0):g} s)"
    )
    for key, name in (
        ("seed", "seed project: 1/3 s segments, threshold 0.25, speaker 1 first"),
        ("ours", ours),
    ):
        r = res[key]
        rows.append(
            f"| {name} | {pct(r['accuracy'])} | {pct(r['merged_accuracy'])} "
            f"| {pct(r['eer']['eer'])} |"
        )
    return "\n".join(rows) + "\n"


CONDITION: dict[str, str] = {}  # conversation key -> dev-set condition


def build(args) -> list[td.Prepared]:
    if args.devset:
        devs = devset.dev_set(args.per_condition, which=args.devset.split(","))
        CONDITION.update({d.key: d.condition for d in devs})
        preps = [td.prepare(d.key, d.conv) for d in devs]
        return preps[: args.limit] if args.limit else preps
    utts = cv.load_speakers(args.speakers_dir)
    if args.speakers:
        speakers = [x for x in args.speakers.split(",") if x]
    else:
        speakers = {"held-out": td.HELD_OUT, "tune": td.TUNE, "all": sorted(utts)}[
            args.split
        ]
    tag = "T" if args.split == "tune" and not args.speakers else "H"
    preps = td.build_split(
        utts, speakers, args.per_triple, args.seed, tag, args.n_turns
    )
    return preps[: args.limit] if args.limit else preps


def run(args) -> dict:
    t_start = time.perf_counter()
    preps = build(args)
    out_dir = Path(args.out_dir)
    png_dir = out_dir / "accuracy"
    png_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = not args.url
    env = {"DIGLETT_MODEL_DIR": args.model_dir} if args.model_dir else {}
    t0 = time.perf_counter()
    with hn.server(args.url, args.token, env, address="local") as srv:
        startup_s = time.perf_counter() - t0
        s = Settings.from_env()
        req = urllib.request.Request(srv.http + "/v1/info")
        if srv.token:
            req.add_header("Authorization", f"Bearer {srv.token}")
        info = json.loads(urllib.request.urlopen(req).read())
        client = EmbeddingClient(
            srv.http, srv.token, cache_dir, info["model"].replace("/", "_")
        )
        ours_tot, seed_tot = mt.Score(), mt.Score()
        by_condition: dict[str, list[mt.Score]] = {}
        ours_tr, seed_tr = ([], []), ([], [])
        per, lat_server, lat_client, warnings = [], [], [], {}
        stream_s = seed_s = 0.0
        for i, p in enumerate(preps):
            conv = p.conv
            t0 = time.perf_counter()
            got = stream_conversation(
                srv, conv, realtime=args.realtime, ahead=args.ahead
            )
            stream_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            slabels, sscores = seed_labels(conv, client)
            seed_s += time.perf_counter() - t0
            labels = got["labels"]
            so = mt.score(conv.truth, labels, conv.speakers, duration_s=conv.duration_s)
            ss = mt.score(
                conv.truth, slabels, conv.speakers, duration_s=conv.duration_s
            )
            ours_tot, seed_tot = ours_tot + so, seed_tot + ss
            cond = CONDITION.get(p.key, "all")
            pair = by_condition.setdefault(cond, [mt.Score(), mt.Score()])
            pair[0], pair[1] = pair[0] + so, pair[1] + ss
            w = got["ready"]["window_s"]
            ahead = got["ready"].get("lookahead_s", 0.0)
            ends = [min(m["end_s"] + ahead, conv.duration_s) for m in labels]
            for acc, wins in (
                (
                    ours_tr,
                    [(max(0, e - w), e, m.get("scores")) for e, m in zip(ends, labels)],
                ),
                (seed_tr, [(a, b, sc) for (a, b, _), sc in zip(slabels, sscores)]),
            ):
                t, n = trials(conv, wins)
                acc[0].extend(t)
                acc[1].extend(n)
            lat_server += [m["latency_ms"] for m in labels if "latency_ms" in m]
            lat_client += got["client_latency_s"]
            for name, m in got["enrolled"].items():
                for wn in m["warnings"] or ["none"]:
                    warnings[wn] = warnings.get(wn, 0) + 1
            png = png_dir / f"{p.key}.png"
            picture(
                png,
                conv,
                labels,
                slabels,
                f"{p.key}: ours {pct(so.accuracy)}, seed {pct(ss.accuracy)} "
                "(4-class, 0.25 s collar)",
            )
            per.append(
                {
                    "key": p.key,
                    "a": conv.a,
                    "b": conv.b,
                    "c": conv.c,
                    "audio_s": conv.duration_s,
                    "ours": so.as_dict(),
                    "seed": ss.as_dict(),
                    "enrolled": got["enrolled"],
                    "summary": got.get("summary"),
                    "png": str(png.relative_to(out_dir)),
                }
            )
            print(
                f"[{i + 1}/{len(preps)}] {p.key}: ours {pct(so.accuracy)} "
                f"(merged {pct(so.merged_accuracy)}), seed {pct(ss.accuracy)}",
                flush=True,
            )
    q = lambda xs, v: float(np.percentile(xs, v)) if len(xs) else None  # noqa: E731
    res = {
        "speakers_dir": str(args.speakers_dir),
        "split": args.speakers or args.split,
        "conversations": len(preps),
        "audio_s": sum(p.conv.duration_s for p in preps),
        "scoring": {"frame_s": 0.1, "collar_s": 0.25, "classes": list(mt.CLASSES)},
        "server": {"url": None if started else args.url, "info": info},
        "settings": {
            k: getattr(s, k)
            for k in ("threshold", "rel_threshold", "gate_dbfs", "speech_min_frac")
        },
        "ours": {**ours_tot.as_dict(), "eer": eer_of(*ours_tr)},
        "seed": {
            **seed_tot.as_dict(),
            "eer": eer_of(*seed_tr),
            "method": "1/3 s segments via POST /v1/embeddings, cos > 0.25, "
            "speaker 1 first, silence by its -55 dBFS gate on 40 % of 20 ms frames",
        },
        "latency": {
            "realtime": args.realtime,
            "server_ms_p50": q(lat_server, 50),
            "server_ms_p95": q(lat_server, 95),
            "client_s_p50": q(lat_client, 50),
            "client_s_p95": q(lat_client, 95),
        },
        "enrollment_warnings": warnings,
        "by_condition": {
            k: {"ours": o.accuracy, "seed": b.accuracy, "frames": o.frames}
            for k, (o, b) in sorted(by_condition.items())
        },
        "per_conversation": per,
        "runtime_s": {
            "total": time.perf_counter() - t_start,
            "server_start": startup_s if started else None,
            "streaming": stream_s,
            "seed_baseline": seed_s,
            "new_seed_embeddings": client.new,
        },
    }
    return res


def report(res: dict) -> None:
    o, b = res["ours"], res["seed"]
    print()
    print(
        f"{res['conversations']} conversations, {res['audio_s'] / 60:.1f} min, "
        f"speakers {res['split']}; {o['frames']} scored 0.1 s frames"
    )
    print(markdown(res))
    print("Confusion, ours (rows truth, columns prediction):")
    print(mt.format_confusion(np.array(o["confusion"])))
    print("Confusion, seed method:")
    print(mt.format_confusion(np.array(b["confusion"])))
    print(
        f"EER ours {pct(o['eer']['eer'])} at cosine {o['eer']['threshold']:.3f} "
        f"({o['eer']['target']} target / {o['eer']['nontarget']} non-target "
        f"{res['server']['info']['window_s']} s windows); seed "
        f"{pct(b['eer']['eer'])} ({b['eer']['target']} / {b['eer']['nontarget']} "
        "1/3 s segments)"
    )
    lat = res["latency"]
    print(
        f"label latency: server p50 {lat['server_ms_p50']:.0f} ms, p95 "
        f"{lat['server_ms_p95']:.0f} ms; client p50 {lat['client_s_p50']:.3f} s, "
        f"p95 {lat['client_s_p95']:.3f} s ({'real time' if lat['realtime'] else 'fast'})"
    )
    print(f"enrollment warnings: {res['enrollment_warnings']}")
    for k, v in res["by_condition"].items():
        print(f"  {k:8s} ours {pct(v['ours'])}, seed {pct(v['seed'])}")
    print(f"run time {res['runtime_s']['total']:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--devset",
        default=devset.HELD,
        help="dev-set folds (bench/devset.py), comma list; '' for --split",
    )
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--speakers-dir", default=str(cv.DEFAULT_SPEAKERS_DIR))
    ap.add_argument("--split", choices=("held-out", "tune", "all"), default="held-out")
    ap.add_argument("--speakers", default="", help="comma list; overrides --split")
    ap.add_argument("--per-triple", type=int, default=2)
    ap.add_argument("--n-turns", type=int, default=14)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--limit", type=int, default=0, help="first N conversations")
    hn.server_args(ap)
    ap.add_argument("--realtime", action="store_true", help="pace audio at 1x")
    ap.add_argument("--ahead", type=int, default=8, help="hops unanswered (fast)")
    ap.add_argument(
        "--model-dir",
        default=os.environ.get("DIGLETT_MODEL_DIR") or str(td.DEFAULT_MODEL_DIR),
    )
    ap.add_argument("--cache-dir", default="/tmp/diglett_bench_cache")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument(
        "--readme-picture",
        default=str(ROOT / "docs" / "accuracy.png"),
        help="where the first conversation's picture is copied ('' = nowhere)",
    )
    args = ap.parse_args(argv)
    res = run(args)
    report(res)
    out = Path(args.out_dir)
    (out / "accuracy.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "accuracy.md").write_text(markdown(res))
    if args.readme_picture and res["per_conversation"]:
        first = out / "accuracy" / f"{res['per_conversation'][0]['key']}.png"
        shutil.copyfile(first, args.readme_picture)
    print(f"wrote {out / 'accuracy.json'}, {out / 'accuracy.md'}, {out / 'accuracy'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
