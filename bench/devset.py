"""A dev set of two-speaker conversations that looks like what users send.

Real speech only (the 41 speakers of `../shared/data/speakers` and
`speakers-more`); what is mixed in is noise and rooms, never speech-like
synthesis. Every conversation belongs to one speaker-disjoint *fold*: its
enrolled A and B, its intruder C and the talkers of its babble all come from
that fold's speakers, so tuning on some folds and scoring another never sees
a scored voice twice. Fold `HELD` is kept back from all tuning.

A conversation (`build`):
- Turns of 0.5-6 s alternate between A and B, with two or three turns by C
  (truth `noise`). A turn is an edge-trimmed piece of one of the speaker's
  utterances *with its own pauses kept*: a pause inside a turn is that
  speaker's turn, as in diarization references.
- Each speaker talks at a natural level drawn from -42..-15 dBFS for the
  conversation, each turn within +-3 dB of it (`TURN_SPREAD_DB`), all
  inside -45..-12 dBFS.
- Between turns, 0.2-2 s of silence; at about one change in five the next
  turn starts 0.1-0.5 s early instead (overlap; truth `noise`, both talking).
  Each conversation also comes as a *quick* copy (`squeeze_gaps`): every
  silence longer than `QUICK_GAP_S` cut to its middle `QUICK_GAP_S`, the
  talk, noise and enrollments the same. In a quick conversation no 0.5 s
  hop falls wholly between turns, as when people answer each other
  promptly.
- One condition per conversation (`CONDITIONS`): a faint floor only; white,
  pink or babble noise (other fold speakers, 4-6 at once) at 5-30 dB under
  the quieter enrolled talker, the intruder raised to at least
  `INTRUDER_MIN_SNR_DB` over it where its own level fell lower (under the
  noise, an intruder is inaudible, yet its truth would be `noise`); or a
  reverberant room (image-source RIRs, RT60 0.3-0.9 s) with a faint floor.
- Enrollments: 5 s of each of A and B from utterances no turn uses, at a
  level (-40..-15 dBFS) and noise (a floor, or white/pink at 20-35 dB SNR)
  drawn apart from the stream's.
- The truth tiles the signal: (start_s, end_s, label), label in
  {A, B, "noise", "silence"}.

    .venv/bin/python -m bench.devset --summary   # what the folds hold
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import conversations as cv

SAMPLE_RATE = cv.SAMPLE_RATE
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPEAKER_DIRS = (SHARED / "speakers", SHARED / "speakers-more")
CONDITIONS = ("clean", "white", "pink", "babble", "reverb")
HELD = "held"
N_FOLDS = 5
INTRUDER_MIN_SNR_DB = 5.0  # the least SNR the conditions ask for
QUICK_GAP_S = 0.3  # the longest silence of a quick copy (squeeze_gaps)
SEED = 20261205  # the dev set's draw; another seed draws fresh conversations
TURN_SPREAD_DB = 3.0  # each turn's level around its talker's (build)
# Kept back from every tuning run: one or two speakers of each big corpus.
HELD_SPEAKERS = (
    "TIMIT-FALR0",
    "TIMIT-MBMA1",
    "VCC2020-TMF1",
    "VCC2020-SEM2",
    "VCTK-p228",
    "ARCTIC-rms",
)


@dataclass(frozen=True)
class Speaker:
    name: str
    corpus: str
    utts: tuple[cv.Utterance, ...]


@dataclass
class DevConversation:
    """A conversation with the facts the report groups by."""

    key: str
    fold: str
    condition: str
    snr_db: float | None
    conv: cv.Conversation
    corpus: dict[str, str]  # speaker -> corpus
    gaps: str = "as built"  # or "quick" (squeeze_gaps)


def short_corpus(name: str) -> str:
    """A corpus's manifest name, shortened for tables."""
    for key in ("TIMIT", "VCC2020", "ARCTIC", "LibriSpeech", "VCTK", "IEEE"):
        if key.lower() in name.lower():
            return key
    return "Thorsten" if "thorsten" in name.lower() else name


def load(dirs=SPEAKER_DIRS) -> dict[str, Speaker]:
    """Every speaker of `dirs`, with its corpus from the manifests."""
    import csv

    out: dict[str, Speaker] = {}
    for d in dirs:
        utts = cv.load_speakers(d)
        with (Path(d) / "manifest.csv").open() as f:
            corpus = {
                r["speaker"]: short_corpus(r["corpus"]) for r in csv.DictReader(f)
            }
        for name, us in utts.items():
            out[name] = Speaker(name, corpus[name], tuple(us))
    return out


def folds(speakers: dict[str, Speaker], n: int = N_FOLDS) -> dict[str, list[str]]:
    """`HELD` and folds "0".."n-1": speaker-disjoint, each corpus spread
    round-robin so that every fold mixes corpora."""
    rest = sorted(
        (s for s in speakers.values() if s.name not in HELD_SPEAKERS),
        key=lambda s: (s.corpus, s.name),
    )
    out: dict[str, list[str]] = {str(i): [] for i in range(n)}
    for i, s in enumerate(rest):
        out[str(i % n)].append(s.name)
    out[HELD] = [s for s in HELD_SPEAKERS if s in speakers]
    return out


# ------------------------------------------------------------------ mixing
def _rir(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """A room impulse response (shape (n,), peak 1) from pyroomacoustics'
    image-source model: a random shoebox room, source and microphone."""
    import pyroomacoustics as pra

    dims = rng.uniform([3.0, 3.0, 2.4], [8.0, 6.0, 3.2])
    e_abs, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(
        dims,
        fs=SAMPLE_RATE,
        materials=pra.Material(e_abs),
        max_order=min(max_order, 12),
    )
    src = rng.uniform([0.5, 0.5, 1.2], dims - [0.5, 0.5, 1.0])
    mic = rng.uniform([0.5, 0.5, 0.8], dims - [0.5, 0.5, 1.2])
    room.add_source(src)
    room.add_microphone(mic)
    room.compute_rir()
    h = np.asarray(room.rir[0][0], dtype=np.float64)
    return (h / np.max(np.abs(h))).astype(np.float32)


def reverberate(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """`x` through room response `h`, same length, direct path aligned."""
    from scipy.signal import fftconvolve

    d = int(np.argmax(np.abs(h)))
    y = fftconvolve(x, h)[d : d + x.size]
    return y.astype(np.float32)


def babble(
    rng: np.random.Generator, talkers: list[Speaker], n: int, k: int
) -> np.ndarray:
    """`k` talkers at once (each an utterance chain at equal level), shape (n,)."""
    out = np.zeros(n, dtype=np.float64)
    for s in rng.choice(len(talkers), size=min(k, len(talkers)), replace=False):
        utts = talkers[int(s)].utts
        parts, have = [], 0
        while have < n:
            u = utts[int(rng.integers(len(utts)))]
            a, b = cv.trim_edges(u.audio)
            parts.append(u.audio[a:b] / (10 ** (cv.active_level_dbfs(u.audio) / 20)))
            have += b - a
        y = np.concatenate(parts)
        off = int(rng.integers(0, max(1, y.size - n)))
        out += y[off : off + n]
    return out.astype(np.float32)


def _noise(rng, kind: str, n: int, dbfs: float, talkers) -> np.ndarray:
    if kind in ("white", "pink"):
        return cv.noise_floor(rng, n, dbfs, kind)
    y = babble(rng, talkers, n, int(rng.integers(4, 7)))
    return y * (10 ** ((dbfs - cv.active_level_dbfs(y)) / 20))


# -------------------------------------------------------------------- build
def _pieces(rng, u: cv.Utterance, lo: float, hi: float) -> list[tuple[int, int]]:
    """Turn-sized (start, end) pieces of `u`, edge-trimmed, pauses kept."""
    s0, e0 = cv.trim_edges(u.audio)
    out, pos = [], s0
    while e0 - pos >= int(lo * SAMPLE_RATE):
        n = min(int(round(rng.uniform(lo, hi) * SAMPLE_RATE)), e0 - pos)
        s, e = cv.trim_edges(u.audio[pos : pos + n])
        if e - s >= int(lo * SAMPLE_RATE):
            out.append((pos + s, pos + e))
        pos += n
    return out


def build(
    rng: np.random.Generator,
    speakers: dict[str, Speaker],
    a: str,
    b: str,
    c: str,
    others: list[str],
    condition: str,
    *,
    n_turns: int = 16,
    key: str = "",
    fold: str = "",
    turn_spread_db: float = TURN_SPREAD_DB,
) -> DevConversation:
    """One conversation of A and B (enrolled) and C; see the module doc."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}")
    spk = {s: speakers[s] for s in (a, b, c)}
    enroll, enroll_files, used = {}, {}, {}
    enroll_level = {s: float(rng.uniform(-40, -15)) for s in (a, b)}
    enroll_noise = str(rng.choice(["floor", "white", "pink"]))
    for s in (a, b, c):
        clip, files = cv.enrollment_clip(list(spk[s].utts), 5.0)
        used[s] = set(files)
        if s == c:
            continue
        clip = clip * cv._gain_to(clip, enroll_level[s])
        if enroll_noise == "floor":
            nd = float(rng.uniform(-70, -60))
        else:
            nd = enroll_level[s] - float(rng.uniform(20, 35))
        clip = clip + cv.noise_floor(
            rng, clip.size, nd, "pink" if enroll_noise == "pink" else "white"
        )
        enroll[s], enroll_files[s] = cv.to_int16_grid(clip), files

    # Turn material: pieces of the utterances the enrollments left, shuffled.
    pools: dict[str, list] = {}
    for s in (a, b, c):
        utts = [u for u in spk[s].utts if u.file not in used[s]] or list(spk[s].utts)
        pools[s] = [(u, p) for u in utts for p in _pieces(rng, u, 0.5, 6.0)]
        rng.shuffle(pools[s])
    order = cv._speaker_order(rng, n_turns, int(rng.integers(2, 4)), a, b, c)
    level = {s: float(rng.uniform(-42, -15)) for s in (a, b, c)}

    n_max = int(SAMPLE_RATE * (n_turns * 8.5 + 3))
    sig = np.zeros(n_max, dtype=np.float64)
    sig_c = np.zeros(n_max, dtype=np.float64)  # C's turns alone (see below)
    track: list[tuple[int, int, str]] = []
    turns: list[cv.Turn] = []
    pos = int(rng.uniform(0.3, 1.5) * SAMPLE_RATE)
    track.append((0, pos, cv.SILENCE))
    rir = (
        {s: _rir(rng, float(rng.uniform(0.3, 0.9))) for s in (a, b, c)}
        if (condition == "reverb")
        else {}
    )
    k = {s: 0 for s in (a, b, c)}
    prev_end = pos
    for i, s in enumerate(order):
        u, (p0, p1) = pools[s][k[s] % len(pools[s])]
        k[s] += 1
        piece = u.audio[p0:p1]
        lvl = float(
            np.clip(level[s] + rng.uniform(-turn_spread_db, turn_spread_db), -45, -12)
        )
        x = piece * cv._gain_to(piece, lvl)
        if s in rir:
            x = reverberate(x, rir[s])
        if i > 0 and rng.random() < 0.2:
            start = prev_end - int(rng.uniform(0.1, 0.5) * SAMPLE_RATE)
        else:
            start = prev_end + int(rng.uniform(0.2, 2.0) * SAMPLE_RATE)
        start = max(start, track[-1][0] + 1)
        end = start + x.size
        sig[start:end] += x
        if s == c:
            sig_c[start:end] += x
        label = cv.NOISE if s == c else s
        if start < prev_end:  # overlap with the turn before
            last_s, _, last_lab = track.pop()
            track.append((last_s, start, last_lab))
            track.append((start, prev_end, cv.NOISE))
            track.append((prev_end, end, label))
        else:
            track.append((prev_end, start, cv.SILENCE))
            track.append((start, end, label))
        turns.append(
            cv.Turn(
                s,
                label,
                u.file,
                p0 / SAMPLE_RATE,
                p1 / SAMPLE_RATE,
                start / SAMPLE_RATE,
                end / SAMPLE_RATE,
                lvl,
            )
        )
        prev_end = end
    n = prev_end + int(rng.uniform(0.3, 1.5) * SAMPLE_RATE)
    track.append((prev_end, n, cv.SILENCE))

    quiet = min(level[a], level[b])
    snr = None
    color = "white"
    if condition in ("white", "pink", "babble"):
        snr = float(rng.uniform(5, 30))
        # C raised after the fact, so that every other draw stays as it was.
        lift = (quiet - snr + INTRUDER_MIN_SNR_DB) - level[c]
        if lift > 0:
            sig = sig + sig_c * (10 ** (lift / 20) - 1)
            turns = [
                (
                    dataclasses.replace(t, level_dbfs=t.level_dbfs + lift)
                    if t.speaker == c
                    else t
                )
                for t in turns
            ]
    sig = sig[:n].astype(np.float32)
    if snr is not None:
        pool = [speakers[o] for o in others]
        sig = sig + _noise(rng, condition, n, quiet - snr, pool)
        color = condition
    floor_db = float(rng.uniform(-70, -62))
    sig = sig + cv.noise_floor(
        rng, n, floor_db, "pink" if rng.random() < 0.5 else "white"
    )
    peak = float(np.max(np.abs(sig)))
    if peak > 0.99:
        sig *= 0.99 / peak
    conv = cv.Conversation(
        a=a,
        b=b,
        c=c,
        enroll=enroll,
        enroll_files=enroll_files,
        signal=cv.to_int16_grid(sig),
        truth=[
            (s / SAMPLE_RATE, e / SAMPLE_RATE, lab) for s, e, lab in cv._merge(track)
        ],
        turns=turns,
        noise_dbfs=floor_db,
        noise_color=color,
    )
    corpus = {s: speakers[s].corpus for s in (a, b, c)}
    return DevConversation(key, fold, condition, snr, conv, corpus)


def fold_conversations(
    speakers: dict[str, Speaker],
    fold: str,
    names: list[str],
    per_condition: int,
    seed: int,
    turn_spread_db: float = TURN_SPREAD_DB,
) -> list[DevConversation]:
    """`per_condition` conversations of each condition among `names`."""
    out = []
    for ci, cond in enumerate(CONDITIONS):
        for r in range(per_condition):
            rng = np.random.default_rng([seed, sum(map(ord, fold)), ci, r])
            a, b, c = (str(x) for x in rng.choice(names, size=3, replace=False))
            others = [x for x in names if x not in (a, b, c)]
            key = f"{fold}-{cond}-{r}-{a}-{b}-{c}"
            out.append(
                build(
                    rng,
                    speakers,
                    a,
                    b,
                    c,
                    others,
                    cond,
                    key=key,
                    fold=fold,
                    turn_spread_db=turn_spread_db,
                )
            )
    return out


def squeeze_gaps(d: DevConversation, gap_s: float) -> DevConversation:
    """`d` with every silence in its truth longer than `gap_s` cut to its
    middle `gap_s` (audio and truth alike); talk and overlaps stay whole."""
    c = d.conv
    keep = int(round(gap_s * SAMPLE_RATE))
    parts, truth, kept, t = [], [], [], 0
    for s, e, label in c.truth:
        a, b = int(round(s * SAMPLE_RATE)), int(round(e * SAMPLE_RATE))
        if label == cv.SILENCE and b - a > keep:
            a = (a + b - keep) // 2
            b = a + keep
        parts.append(c.signal[a:b])
        truth.append((t / SAMPLE_RATE, (t + b - a) / SAMPLE_RATE, label))
        kept.append((s, e, a / SAMPLE_RATE, b / SAMPLE_RATE, t / SAMPLE_RATE))
        t += b - a

    def moved(x: float) -> float:  # a time of `c` in the squeezed copy
        for _, e, a, b, new in kept:
            if x < e:
                return new + min(max(x, a), b) - a
        return t / SAMPLE_RATE  # the end

    turns = [
        dataclasses.replace(u, start_s=moved(u.start_s), end_s=moved(u.end_s))
        for u in c.turns
    ]
    conv = dataclasses.replace(
        c, signal=np.concatenate(parts), truth=truth, turns=turns
    )
    return dataclasses.replace(d, conv=conv)


def quick_copy(d: DevConversation) -> DevConversation:
    """`d` as a quick conversation (see the module doc)."""
    q = squeeze_gaps(d, QUICK_GAP_S)
    return dataclasses.replace(q, key=f"quick-{d.key}", gaps="quick")


def dev_set(
    per_condition: int = 4,
    seed: int = SEED,
    which: list[str] | None = None,
    quick: bool = True,
    turn_spread_db: float = TURN_SPREAD_DB,
) -> list[DevConversation]:
    """The conversations of the folds in `which` (default: all, HELD last),
    each fold's quick copies after its own (`quick`)."""
    speakers = load()
    fs = folds(speakers)
    out = []
    for f in which or list(fs):
        convs = fold_conversations(
            speakers, f, fs[f], per_condition, seed, turn_spread_db
        )
        out += convs + ([quick_copy(d) for d in convs] if quick else [])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args(argv)
    speakers = load()
    for f, names in folds(speakers).items():
        corp = sorted({speakers[n].corpus for n in names})
        print(f"fold {f}: {len(names)} speakers ({', '.join(corp)}): {' '.join(names)}")
    if args.summary:
        convs = dev_set(args.per_condition)
        dur = sum(d.conv.duration_s for d in convs)
        print(f"{len(convs)} conversations, {dur / 60:.1f} min")
        for d in convs[:5]:
            print(d.key, f"{d.conv.duration_s:.1f} s", d.snr_db)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
