#!/usr/bin/env python
"""Cross-validated accuracy of the session decision on the dev set.

The dev set (`bench/devset.py`): 41 real speakers in five speaker-disjoint
folds plus a held-back fold, conversations in five conditions (clean, white,
pink and babble noise at 5-30 dB SNR, reverberant rooms), talkers from -45
to -12 dBFS, pauses kept inside turns, overlaps at some turn changes,
enrollments at another level and noise than the stream.

Every conversation is replayed through the server's own `SessionEngine`
(enroll A and B in 0.1 s pcm_s16le frames, stream, end), its embedding jobs
answered by the real ECAPA model (int8, as a CPU replica serves it), cached
on disk by the samples (`bench/embed_cache.py`). For each setting of the
grid (`--grid`), each fold is scored with the setting that did best on the
other four folds (pooled four-class frame accuracy; 0.1 s frames, 0.25 s
collar, bench/metrics.py); the table gives every fold, the mean and the
worst, and the results by corpus (frames of each true talker's corpus) and
by condition. The held-back fold is scored once, with the setting chosen on
all five. Beside it: the same with one hop of look-ahead, and the seed
project's method (1/3 s segments, cosine > 0.25, speaker 1 first, silence by
the -55 dBFS level gate), and the chosen setting on a fresh draw of the
conversations (`--fresh-seed`), which no rule was screened on.
`--engine-root DIR` replays another checkout's `diglett` (e.g. the code
before this decision, for "today's defaults").

    .venv/bin/python -m bench.cv_decision                 # ~12 min on 2 CPUs, cached
    .venv/bin/python -m bench.cv_decision --quick         # 1 conversation a condition
Writes bench/results/cv_decision.json and the tables of docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _engine_path(argv) -> None:
    """`--engine-root DIR` must be on sys.path before `diglett` is imported."""
    for i, a in enumerate(argv):
        if a == "--engine-root" and i + 1 < len(argv):
            sys.path.insert(0, argv[i + 1])


_engine_path(sys.argv)

from bench import devset  # noqa: E402
from bench.doc_blocks import write_block  # noqa: E402
from bench import metrics as mt  # noqa: E402
from bench import tune_decision as td  # noqa: E402
from bench.embed_cache import EmbedCache  # noqa: E402
from diglett.settings import Settings  # noqa: E402

GRID = {"rel_threshold": (0.25, 0.3, 0.35), "speech_min_frac": (0.2, 0.3, 0.45)}
# The fresh draw's seed (`fresh_draw`): any seed but devset.SEED will do;
# 7 is the one docs/accuracy.md first measured.
FRESH_SEED = 7


# --------------------------------------------------------------- ablations
def _patch(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    return lambda: setattr(module, name, old)


def _no_part():
    from diglett.engine import speech

    return _patch(speech, "speech_part_start", lambda w0, *a, **k: w0)


def _no_adapt():
    from diglett.engine import decision

    return _patch(decision, "ADAPT_MAX_WEIGHT", 0.0)


def _strict_adapt():
    from diglett.engine import decision

    undo = [_patch(decision, "ADAPT_MARGIN", 0.15), _patch(decision, "ADAPT_GAP", 0.3)]
    return lambda: [u() for u in undo]


def _no_others():
    from diglett.engine import decision

    return _patch(decision, "OTHERS_MIN_CONF", float("inf"))


def _others_far():
    from diglett.engine import decision

    return _patch(decision, "OTHERS_MARGIN", 0.1)


def _no_faint_match():
    from diglett.engine import session

    return _patch(session.SessionEngine, "_faint_match", lambda self, *a: False)


# (name, patch returning its undo, settings changed): each step taken away
# from the chosen setting alone, to show what it buys, and variants of it.
ABLATIONS = (
    ("without speech-part windows", _no_part, {}),
    ("without adapting references", _no_adapt, {}),
    ("adapting on clearer wins only (0.15 / 0.3)", _strict_adapt, {}),
    ("level gate instead of Silero VAD", lambda: (lambda: None), {"vad": "energy"}),
    ("without the background rule", lambda: (lambda: None), {"background_prob": 0.0}),
    (
        "without the background-level rule",
        lambda: (lambda: None),
        {"background_margin_db": 0.0},
    ),
    (
        "background rules in any background, not only babble",
        lambda: (lambda: None),
        {"background_motion_db": 0.0},
    ),
    ("without learning the session's others", _no_others, {}),
    ("others only from windows 0.1 under every bar (before)", _others_far, {}),
    ("without the second look", lambda: (lambda: None), {"change_drop": 0.0}),
    (
        "without the quiet-speech recheck",
        lambda: (lambda: None),
        {"quiet_gain_db": 0.0},
    ),
    ("without faint matches at the background level", _no_faint_match, {}),
)


# ------------------------------------------------------------------ replay
def replay(prep: td.Prepared, settings: Settings, cache: EmbedCache) -> list[dict]:
    """The label messages of one conversation through a fresh engine."""
    return replay_engine(prep, settings, cache)[0]


def replay_engine(prep: td.Prepared, settings: Settings, cache: EmbedCache):
    """(the label messages, the engine after the stream) of one
    conversation through a fresh engine.

    The windows the engine asks for depend only on the audio and the
    settings, so a first pass collects them (answering with placeholders)
    and the model embeds them in batches; the second pass is the real one.
    """
    asked: list[np.ndarray] = []

    def record(job):
        asked.append(np.asarray(job.audio, np.float32))
        return np.ones(192, np.float32)

    td.drive(prep, settings, record, record)
    cache.embed(asked)

    def answer(job):
        return cache.embed([np.asarray(job.audio, np.float32)])[0]

    msgs, engine = td.drive(prep, settings, answer, answer)
    return td.label_msgs(msgs), engine


def seed_labels(prep: td.Prepared, cache: EmbedCache) -> list[tuple]:
    """The seed project's method on the same audio (see the module doc);
    `tune_decision.baseline_labels` with this cache's embeddings."""
    conv = prep.conv
    c = td.Cache()
    enroll = cache.embed([conv.enroll[n] for n in conv.speakers])
    c.enroll = dict(zip(conv.speakers, enroll))
    bounds = td.baseline_segments(conv.signal.size)
    c.baseline = np.stack(cache.embed([conv.signal[s:e] for s, e in bounds]))
    return td.baseline_labels(prep, c, td.SEED_GATE_DBFS, td.SEED_MIN_FRAC)


# ----------------------------------------------------------------- scoring
@dataclasses.dataclass
class ConvScore:
    """A conversation's score, overall and by the true talker's corpus."""

    total: mt.Score
    by_corpus: dict[str, mt.Score]


def score_conv(d: devset.DevConversation, labels) -> ConvScore:
    c = d.conv
    ft = mt.frame_table(c.truth, labels, c.speakers, duration_s=c.duration_s)
    corpus_of = {0: d.corpus[c.a], 1: d.corpus[c.b], 2: d.corpus[c.c]}
    by = {}
    for cls, corp in corpus_of.items():
        part = mt.score_table(ft, ft.truth == cls)
        by[corp] = by[corp] + part if corp in by else part
    by["(silence)"] = mt.score_table(ft, ft.truth == 3)
    return ConvScore(mt.score_table(ft), by)


_WORK: dict = {}  # what forked workers replay (set before the pool forks)


def _score_one(i: int) -> tuple[ConvScore, dict[str, np.ndarray]]:
    devs, preps, settings, cache = _WORK["args"]
    cache.added = []
    sc = score_conv(devs[i], replay(preps[i], settings, cache))
    return sc, {k: cache.cache[k] for k in cache.added}


def score_all(devs, preps, settings: Settings, cache: EmbedCache, jobs: int = 1):
    """Every conversation replayed and scored, in `jobs` forked processes
    (a fork per call, so module patches of an ablation reach the workers);
    the embeddings they computed join `cache`."""
    if jobs <= 1:
        return [score_conv(d, replay(p, settings, cache)) for d, p in zip(devs, preps)]
    _WORK["args"] = (devs, preps, settings, cache)
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        out = pool.map(_score_one, range(len(devs)), chunksize=1)
    for _, new in out:
        cache.cache.update(new)
        cache.new += len(new)
    return [sc for sc, _ in out]


def pooled(scores: list[ConvScore]) -> mt.Score:
    return mt.total(s.total for s in scores)


def groups(devs, scores: list[ConvScore]) -> dict[str, dict[str, float]]:
    """Accuracy by fold, condition, gaps between turns and corpus."""
    out: dict[str, dict[str, mt.Score]] = defaultdict(dict)
    for d, s in zip(devs, scores):
        for key, name in (
            ("fold", d.fold),
            ("condition", d.condition),
            ("gaps", d.gaps),
        ):
            out[key][name] = out[key].get(name, mt.Score()) + s.total
        for corp, sc in s.by_corpus.items():
            out["corpus"][corp] = out["corpus"].get(corp, mt.Score()) + sc
    return {
        k: {n: round(v.accuracy, 4) for n, v in sorted(g.items()) if v.frames}
        for k, g in out.items()
    }


# -------------------------------------------------------------------- main
def settings_grid(base: dict) -> list[dict]:
    keys = list(GRID)
    combos = [{}]
    for k in keys:
        combos = [{**c, k: v} for c in combos for v in GRID[k]]
    return [{**base, **c} for c in combos]


def run(args) -> dict:
    t0 = time.perf_counter()
    devs = devset.dev_set(args.per_condition)
    preps = [td.prepare(d.key, d.conv) for d in devs]
    cache = EmbedCache(Path(args.cache))
    env = Settings.from_env(dotenv=False)
    base = {} if args.defaults_only else {}
    grid = [{}] if args.defaults_only else settings_grid(base)
    res: dict = {"conversations": len(devs), "audio_min": 0.0, "grid": grid}
    res["audio_min"] = round(sum(d.conv.duration_s for d in devs) / 60, 1)
    per_setting: list[list[ConvScore]] = []
    for gi, g in enumerate(grid):
        s = dataclasses.replace(env, **g)
        scores = score_all(devs, preps, s, cache, args.jobs)
        cache.save()
        per_setting.append(scores)
        print(f"[{gi + 1}/{len(grid)}] {g}: {pooled(scores).accuracy:.4f}", flush=True)
    folds = [f for f in dict.fromkeys(d.fold for d in devs) if f != devset.HELD]
    idx = {f: [i for i, d in enumerate(devs) if d.fold == f] for f in folds}
    held = [i for i, d in enumerate(devs) if d.fold == devset.HELD]

    def pick(train: list[int]) -> int:
        accs = [pooled([sc[i] for i in train]).accuracy for sc in per_setting]
        return int(np.argmax(accs))

    cv_rows, cv_scores = [], [None] * len(devs)
    for f in folds:
        train = [i for g in folds if g != f for i in idx[g]]
        k = pick(train)
        sc = [per_setting[k][i] for i in idx[f]]
        for i in idx[f]:
            cv_scores[i] = per_setting[k][i]
        acc = pooled(sc)
        cv_rows.append(
            {
                "fold": f,
                "setting": grid[k],
                "accuracy": acc.accuracy,
                "merged": acc.merged_accuracy,
            }
        )
    cv_idx = [i for f in folds for i in idx[f]]
    cv_devs = [devs[i] for i in cv_idx]
    cv_sc = [cv_scores[i] for i in cv_idx]
    k_all = pick(cv_idx)
    accs = [r["accuracy"] for r in cv_rows]
    res["cv"] = {
        "folds": cv_rows,
        "mean": float(np.mean(accs)),
        "worst": float(np.min(accs)),
        "pooled": pooled(cv_sc).as_dict(),
        "groups": groups(cv_devs, cv_sc),
    }
    res["chosen"] = grid[k_all]
    chosen = dataclasses.replace(env, **grid[k_all])
    held_sc = [per_setting[k_all][i] for i in held]
    res["held"] = {
        **pooled(held_sc).as_dict(),
        "groups": groups([devs[i] for i in held], held_sc),
    }
    if args.ablations:
        res["ablations"] = {}
        for name, patch, change in ABLATIONS:
            undo = patch()
            try:
                s_ab = dataclasses.replace(chosen, **change)
                sc = score_all(devs, preps, s_ab, cache, args.jobs)
            finally:
                undo()
            cache.save()
            res["ablations"][name] = {
                "cv_folds": [pooled([sc[i] for i in idx[f]]).accuracy for f in folds],
                "held": pooled([sc[i] for i in held]).accuracy,
            }
            print(f"ablation {name}: {res['ablations'][name]}", flush=True)
    if not args.skip_extras:
        extras = []
        for name, hops in LOOKAHEADS:
            la = dataclasses.replace(chosen, lookahead_hops=hops)
            extras.append((name, score_all(devs, preps, la, cache, args.jobs)))
        seed_sc = [score_conv(d, seed_labels(p, cache)) for d, p in zip(devs, preps)]
        cache.save()
        for name, sc in extras + [("seed", seed_sc)]:
            res[name] = by_fold(devs, sc)
    if args.fresh_seed and not args.skip_extras:
        res["fresh"] = fresh_draw(args, chosen, cache)
    res["runtime_s"] = round(time.perf_counter() - t0, 1)
    return res


def fresh_draw(args, chosen: Settings, cache: EmbedCache) -> dict:
    """The chosen setting on the same speakers' conversations drawn anew
    (`--fresh-seed`): every rule was screened on the dev set's own draw,
    so this is the figure to expect of speech that no screen saw
    (docs/accuracy.md, "A fresh draw"). Nothing is tuned on it."""
    devs = devset.dev_set(args.per_condition, seed=args.fresh_seed)
    preps = [td.prepare(d.key, d.conv) for d in devs]
    sc = score_all(devs, preps, chosen, cache, args.jobs)
    cache.save()
    return {"seed": args.fresh_seed, **by_fold(devs, sc)}


def by_fold(devs, scores: list[ConvScore]) -> dict:
    """One method's scores of `devs`, as the tables give them: each
    cross-validation fold's accuracy, the five pooled (and by group), the
    held-back fold's."""
    folds = [f for f in dict.fromkeys(d.fold for d in devs) if f != devset.HELD]
    idx = {f: [i for i, d in enumerate(devs) if d.fold == f] for f in folds}
    cv_idx = [i for f in folds for i in idx[f]]
    held = [i for i, d in enumerate(devs) if d.fold == devset.HELD]
    return {
        "cv_folds": [pooled([scores[i] for i in idx[f]]).accuracy for f in folds],
        "pooled": pooled([scores[i] for i in cv_idx]).as_dict(),
        "held": pooled([scores[i] for i in held]).accuracy,
        "groups": groups([devs[i] for i in cv_idx], [scores[i] for i in cv_idx]),
    }


# The look-ahead rows (`DIGLETT_LOOKAHEAD_HOPS`) beside the defaults.
LOOKAHEADS = (("lookahead", 1.0), ("lookahead_half", 0.5))


def ahead_name(hops: float) -> str:
    return f"{hops * Settings().hop_s:g} s look-ahead"


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def markdown(res: dict, today: dict | None = None, ablations: bool = True) -> str:
    """The tables of docs/accuracy.md (and the README's, without the
    ablation rows: `ablations` False)."""
    cv = res["cv"]
    folds = [r["fold"] for r in cv["folds"]]
    cols = ["method"] + [f"fold {f}" for f in folds] + ["mean", "worst", "held-back"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(name, fold_accs, held):
        return (
            f"| {name} | "
            + " | ".join(pct(a) for a in fold_accs)
            + f" | **{pct(np.mean(fold_accs))}** | {pct(min(fold_accs))} | {pct(held)} |"
        )

    rows.append(
        row(
            "new defaults (cross-validated)",
            [r["accuracy"] for r in cv["folds"]],
            res["held"]["accuracy"],
        )
    )
    for name, hops in LOOKAHEADS:
        if name in res:
            la = res[name]
            rows.append(
                row(f"the same, {ahead_name(hops)}", la["cv_folds"], la["held"])
            )
    if "fresh" in res:
        fr = res["fresh"]
        rows.append(
            row(
                f"the same, a fresh draw (seed {fr['seed']})",
                fr["cv_folds"],
                fr["held"],
            )
        )
    if today:
        rows.append(
            row("before (energy gate, whole windows)", today["cv_folds"], today["held"])
        )
    for name, ab in res.get("ablations", {}).items() if ablations else ():
        rows.append(row(f"new defaults {name}", ab["cv_folds"], ab["held"]))
    if "seed" in res:
        rows.append(
            row("seed project's method", res["seed"]["cv_folds"], res["seed"]["held"])
        )
    out = [
        "Four-class frame accuracy (A, B, noise, silence), 0.1 s frames, 0.25 s collar.",
        "",
    ]
    out += rows
    for key, title in (
        ("condition", "condition"),
        ("gaps", "gaps between turns (as built, or quick: cut to 0.3 s)"),
        ("corpus", "corpus (frames of its talkers)"),
    ):
        if key not in cv["groups"]:
            continue
        names = list(cv["groups"][key])
        out += ["", f"By {title}, over the five cross-validation folds:", ""]
        out.append("| method | " + " | ".join(names) + " |")
        out.append("|" + "---|" * (len(names) + 1))
        srcs = [("new defaults", cv["groups"])]
        for name, hops in LOOKAHEADS:
            if name in res:
                srcs.append((ahead_name(hops), res[name]["groups"]))
        if "fresh" in res:
            srcs.append(
                (f"a fresh draw (seed {res['fresh']['seed']})", res["fresh"]["groups"])
            )
        if today:
            srcs.append(("before", today["groups"]))
        if "seed" in res:
            srcs.append(("seed", res["seed"]["groups"]))
        for name, g in srcs:
            cells = [pct(g.get(key, {}).get(n)) for n in names]
            if all(c == pct(None) for c in cells):
                continue  # a method measured before this split existed
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="1 conversation a condition")
    ap.add_argument("--cache", default="/tmp/diglett_bench_cache/cv_embeddings.npz")
    ap.add_argument("--engine-root", default="", help="replay this checkout's diglett")
    ap.add_argument(
        "--defaults-only", action="store_true", help="no grid: DIGLETT_* as set"
    )
    ap.add_argument("--jobs", type=int, default=1, help="replay in N processes")
    ap.add_argument(
        "--skip-extras",
        action="store_true",
        help="no look-ahead, no seed, no fresh draw",
    )
    ap.add_argument(
        "--fresh-seed",
        type=int,
        default=FRESH_SEED,
        help="also score the chosen setting on conversations drawn anew (0: not)",
    )
    ap.add_argument("--ablations", action="store_true", help="each step taken away")
    ap.add_argument(
        "--today", default="", help="a --defaults-only run's JSON, as 'before'"
    )
    ap.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "cv_decision.json")
    )
    ap.add_argument(
        "--table",
        default=str(ROOT / "docs" / "accuracy.md"),
        help="a file whose cv_decision block gets the tables ('' = none)",
    )
    ap.add_argument("--report-only", action="store_true", help="tables from --out")
    ap.add_argument(
        "--no-ablation-rows",
        action="store_true",
        help="leave the ablations out of the tables (the README's)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.per_condition = 1
    if args.report_only:
        res = json.loads(Path(args.out).read_text())
    else:
        res = run(args)
    today = res.get("today")
    if args.today:
        t = json.loads(Path(args.today).read_text())
        today = {
            "cv_folds": [r["accuracy"] for r in t["cv"]["folds"]],
            "held": t["held"]["accuracy"],
            "groups": t["cv"]["groups"],
        }
    if today:
        res["today"] = today
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    table = markdown(res, today, ablations=not args.no_ablation_rows)
    if args.table:
        write_block(Path(args.table), "cv_decision", table)
    print(table)
    print(f"chosen: {res['chosen']}; run time {res['runtime_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
