"""Synthetic two-speaker conversations with a frame-exact truth track.

Pure numpy + soundfile. A conversation is built from the dev-set utterances
(`manifest.csv`: file, speaker, duration_s, ... ; 16 kHz mono WAV):

- Enrollment clips for the two enrolled speakers A and B: 5 s each, cut from
  the speaker's longest utterances (edge-trimmed, joined when one is too
  short), level-normalised to `enroll_level_dbfs`, with the conversation's
  noise floor added. The utterances an enrollment uses are never used in any
  conversation turn (for any speaker, C included, so the rule holds however
  the speakers are combined).
- The conversation: `n_turns` turns that alternate between A and B, with some
  turns (never two in a row, never the first) by a third, unenrolled speaker
  C, whose truth label is "noise". Each turn is a 1.5-4 s piece of one of the
  speaker's other utterances, scaled to a speech level drawn from
  `level_dbfs` (-30..-18 dBFS), lowered further only if it would clip.
  Pauses of 0.3-1.5 s separate the turns (and lead and trail the
  conversation). A faint noise floor (white or pink, -68..-62 dBFS RMS) runs
  under the whole signal. The signal is quantised to the int16 grid, so it is
  exactly what a client sending pcm_s16le delivers.
- The truth track tiles the signal: (start_s, end_s, label) with label in
  {A, B, "noise", "silence"}, adjacent equal labels merged.

Energy criteria (all relative to the piece's own *active level*, the power
mean of its loudest half of 20 ms frames, so they do not depend on the gain):

- Edge trimming: a turn starts at its first and ends at its last 20 ms frame
  within `EDGE_REL_DB` (20 dB) of the active level. This removes leading and
  trailing pauses and background noise (LibriSpeech has a floor only ~27 dB
  under speech) so a turn's truth does not start before its speech does.
- Inner silence: a run of at least `INNER_SILENCE_S` (0.3 s) of frames more
  than `INNER_REL_DB` (30 dB) under the active level inside a turn is
  labelled "silence"; shorter or louder pauses keep the speaker's label, as a
  person labelling turns would.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
FRAME = 320  # 20 ms
EDGE_REL_DB = 20.0
INNER_REL_DB = 30.0
INNER_SILENCE_S = 0.3
NOISE = "noise"
SILENCE = "silence"
DEFAULT_SPEAKERS_DIR = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speakers"
)


@dataclass(frozen=True)
class Utterance:
    """One dev-set utterance: float32 samples at 16 kHz, shape (n,)."""

    file: str
    speaker: str
    audio: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


@dataclass
class Turn:
    """Where one turn came from and where it sits in the conversation."""

    speaker: str
    label: str
    file: str
    src_start_s: float
    src_end_s: float
    start_s: float
    end_s: float
    level_dbfs: float


@dataclass
class Conversation:
    a: str
    b: str
    c: str
    enroll: dict[str, np.ndarray]  # speaker -> float32 clip, shape (n,)
    enroll_files: dict[str, list[str]]
    signal: np.ndarray  # float32, shape (n,), on the int16 grid
    truth: list[tuple[float, float, str]]
    turns: list[Turn] = field(default_factory=list)
    noise_dbfs: float = -65.0
    noise_color: str = "white"
    reused_pieces: int = 0  # turns cut again from already used audio

    @property
    def duration_s(self) -> float:
        return self.signal.size / SAMPLE_RATE

    @property
    def speakers(self) -> tuple[str, str]:
        return (self.a, self.b)


# ------------------------------------------------------------------ loading
def load_speakers(folder: str | Path) -> dict[str, list[Utterance]]:
    """Utterances by speaker from `folder/manifest.csv`, longest first."""
    folder = Path(folder)
    by: dict[str, list[Utterance]] = {}
    with (folder / "manifest.csv").open() as f:
        for row in csv.DictReader(f):
            x, rate = sf.read(folder / row["file"], dtype="float32", always_2d=True)
            if rate != SAMPLE_RATE:
                raise ValueError(f"{row['file']}: {rate} Hz, expected {SAMPLE_RATE}")
            audio = np.ascontiguousarray(x.mean(axis=1), dtype=np.float32)
            by.setdefault(row["speaker"], []).append(
                Utterance(row["file"], row["speaker"], audio)
            )
    for utts in by.values():
        utts.sort(key=lambda u: (-u.audio.size, u.file))
    return by


def ordered_triples(speakers: list[str]) -> list[tuple[str, str, str]]:
    """Every ordered choice of (A, B, C) among `speakers`."""
    return list(permutations(sorted(speakers), 3))


# ------------------------------------------------------------------- levels
def frame_dbfs(x: np.ndarray) -> np.ndarray:
    """Level of each whole 20 ms frame of `x`, shape (n // 320,)."""
    n = x.size // FRAME
    if n == 0:
        return np.zeros(0)
    ms = np.mean(np.square(x[: n * FRAME].reshape(n, FRAME), dtype=np.float64), 1)
    return 10.0 * np.log10(np.maximum(ms, 1e-12))


def active_level_dbfs(x: np.ndarray) -> float:
    """Power mean of the loudest half of the 20 ms frames of `x`."""
    db = frame_dbfs(x)
    if db.size == 0:
        return -120.0
    top = np.sort(db)[db.size // 2 :]
    return float(10.0 * np.log10(np.mean(10.0 ** (top / 10.0))))


def trim_edges(x: np.ndarray, rel_db: float = EDGE_REL_DB) -> tuple[int, int]:
    """(start, end) samples of `x` without leading/trailing quiet frames."""
    db = frame_dbfs(x)
    loud = np.flatnonzero(db >= active_level_dbfs(x) - rel_db)
    if loud.size == 0:
        return 0, 0
    return int(loud[0] * FRAME), int(min(x.size, (loud[-1] + 1) * FRAME))


def quiet_runs(
    x: np.ndarray, rel_db: float = INNER_REL_DB, min_s: float = INNER_SILENCE_S
) -> list[tuple[int, int]]:
    """(start, end) samples of runs of >= `min_s` of frames `rel_db` under
    the active level of `x`."""
    db = frame_dbfs(x)
    quiet = np.concatenate([db < active_level_dbfs(x) - rel_db, [False]])
    runs, start = [], None
    min_frames = int(round(min_s * SAMPLE_RATE / FRAME))
    for i, q in enumerate(quiet):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if i - start >= min_frames:
                runs.append((start * FRAME, i * FRAME))
            start = None
    return runs


def noise_floor(rng: np.random.Generator, n: int, dbfs: float, color: str):
    """White or pink (1/f power) noise of RMS level `dbfs`, shape (n,)."""
    w = rng.standard_normal(n)
    if color == "pink" and n > 1:
        spec = np.fft.rfft(w)
        f = np.arange(spec.size, dtype=np.float64)
        f[0] = 1.0
        w = np.fft.irfft(spec / np.sqrt(f), n)
    elif color != "white":
        raise ValueError(f"unknown noise color {color!r}")
    rms = float(np.sqrt(np.mean(np.square(w)))) or 1.0
    return (w * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def to_int16_grid(x: np.ndarray) -> np.ndarray:
    """`x` rounded to what pcm_s16le carries, as float32 in [-1, 1)."""
    q = np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767)
    return (q / 32768.0).astype(np.float32)


def to_s16_bytes(x: np.ndarray) -> bytes:
    q = np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767)
    return q.astype("<i2").tobytes()


def _gain_to(x: np.ndarray, level_dbfs: float, peak: float = 0.99) -> float:
    """Gain that brings the active level of `x` to `level_dbfs`, without clipping."""
    g = 10 ** ((level_dbfs - active_level_dbfs(x)) / 20)
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if top * g > peak:
        g = peak / top
    return g


# -------------------------------------------------------------- enrollment
def enrollment_clip(
    utts: list[Utterance], seconds: float = 5.0
) -> tuple[np.ndarray, list[str]]:
    """`seconds` of edge-trimmed speech from the longest utterances.

    Returns the clip (float32, unscaled) and the files it used.
    """
    need = int(round(seconds * SAMPLE_RATE))
    parts, files, have = [], [], 0
    for u in sorted(utts, key=lambda u: (-u.audio.size, u.file)):
        s, e = trim_edges(u.audio)
        parts.append(u.audio[s:e])
        files.append(u.file)
        have += e - s
        if have >= need:
            break
    if have < need:
        raise ValueError(f"{utts[0].speaker}: less than {seconds} s of audio")
    return np.concatenate(parts)[:need].astype(np.float32), files


def enrollment_files(utts: list[Utterance], seconds: float = 5.0) -> set[str]:
    """The files `enrollment_clip` uses for this speaker."""
    return set(enrollment_clip(utts, seconds)[1])


# -------------------------------------------------------------------- turns
class _PieceSource:
    """Turn-sized pieces of one speaker's non-enrollment utterances.

    Each utterance is cut into consecutive pieces of random length; each
    piece is edge-trimmed and kept when at least `min_s` of it remains. The
    pieces are shuffled and handed out without repetition; only when all are
    used are the utterances cut again (counted in `reused`).
    """

    def __init__(self, rng, utts: list[Utterance], turn_s: tuple[float, float]):
        self.rng, self.utts, self.turn_s = rng, utts, turn_s
        self.queue: list[tuple[Utterance, int, int]] = []
        self.rounds = 0
        self.reused = 0

    def _refill(self) -> None:
        lo, hi = self.turn_s
        pieces = []
        for u in self.utts:
            s0, e0 = trim_edges(u.audio)
            pos = s0
            while e0 - pos >= int(lo * SAMPLE_RATE):
                n = int(round(self.rng.uniform(lo, hi) * SAMPLE_RATE))
                n = min(n, e0 - pos)
                s, e = trim_edges(u.audio[pos : pos + n])
                if e - s >= int(lo * SAMPLE_RATE):
                    pieces.append((u, pos + s, pos + e))
                pos += n
        if not pieces:
            raise ValueError(f"no {lo:g} s pieces for {self.utts[0].speaker}")
        self.rng.shuffle(pieces)
        self.queue = pieces
        self.rounds += 1

    def next(self) -> tuple[Utterance, int, int]:
        if not self.queue:
            self._refill()
        if self.rounds > 1:
            self.reused += 1
        return self.queue.pop()


def _speaker_order(rng, n_turns: int, n_c: int, a: str, b: str, c: str) -> list[str]:
    """Alternating A/B turns with `n_c` non-adjacent C turns (never first)."""
    n_c = min(n_c, n_turns // 2)
    for _ in range(1000):
        pos = sorted(rng.choice(np.arange(1, n_turns), size=n_c, replace=False))
        if all(q - p > 1 for p, q in zip(pos, pos[1:])):
            break
    else:  # pragma: no cover - tiny n_turns
        pos = list(range(1, n_turns, 2))[:n_c]
    ab = [a, b] if rng.random() < 0.5 else [b, a]
    order, k = [], 0
    for i in range(n_turns):
        if i in pos:
            order.append(c)
        else:
            order.append(ab[k % 2])
            k += 1
    return order


def _merge(track: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for s, e, lab in track:
        if e <= s:
            continue
        if out and out[-1][2] == lab and out[-1][1] == s:
            out[-1] = (out[-1][0], e, lab)
        else:
            out.append((s, e, lab))
    return out


def build_conversation(
    rng: np.random.Generator,
    utts_by_speaker: dict[str, list[Utterance]],
    a: str,
    b: str,
    c: str,
    *,
    n_turns: int = 14,
    c_share: float = 0.2,
    enroll_s: float = 5.0,
    enroll_level_dbfs: float = -24.0,
    turn_s: tuple[float, float] = (1.5, 4.0),
    pause_s: tuple[float, float] = (0.3, 1.5),
    level_dbfs: tuple[float, float] = (-30.0, -18.0),
    noise_dbfs: tuple[float, float] = (-68.0, -62.0),
) -> Conversation:
    """One conversation between enrolled A and B, interrupted by unenrolled C."""
    if len({a, b, c}) != 3:
        raise ValueError("A, B and C must be three different speakers")
    noise_db = float(rng.uniform(*noise_dbfs))
    color = "pink" if rng.random() < 0.5 else "white"

    used = {s: enrollment_files(utts_by_speaker[s], enroll_s) for s in (a, b, c)}
    enroll, enroll_files = {}, {}
    for s in (a, b):
        clip, files = enrollment_clip(utts_by_speaker[s], enroll_s)
        clip = clip * _gain_to(clip, enroll_level_dbfs)
        clip = clip + noise_floor(rng, clip.size, noise_db, color)
        enroll[s] = to_int16_grid(clip)
        enroll_files[s] = files

    sources = {
        s: _PieceSource(
            rng, [u for u in utts_by_speaker[s] if u.file not in used[s]], turn_s
        )
        for s in (a, b, c)
    }
    order = _speaker_order(rng, n_turns, max(1, int(round(c_share * n_turns))), a, b, c)

    def pause() -> int:
        return int(round(rng.uniform(*pause_s) * SAMPLE_RATE))

    chunks: list[np.ndarray] = []
    track: list[tuple[int, int, str]] = []
    turns: list[Turn] = []
    pos = 0

    def add_silence(n: int) -> None:
        nonlocal pos
        chunks.append(np.zeros(n, dtype=np.float32))
        track.append((pos, pos + n, SILENCE))
        pos += n

    add_silence(pause())
    for speaker in order:
        u, s, e = sources[speaker].next()
        piece = u.audio[s:e]
        g = _gain_to(piece, float(rng.uniform(*level_dbfs)))
        label = NOISE if speaker == c else speaker
        cursor = 0
        for qs, qe in quiet_runs(piece):
            track.append((pos + cursor, pos + qs, label))
            track.append((pos + qs, pos + qe, SILENCE))
            cursor = qe
        track.append((pos + cursor, pos + piece.size, label))
        chunks.append((piece * g).astype(np.float32))
        turns.append(
            Turn(
                speaker=speaker,
                label=label,
                file=u.file,
                src_start_s=s / SAMPLE_RATE,
                src_end_s=e / SAMPLE_RATE,
                start_s=pos / SAMPLE_RATE,
                end_s=(pos + piece.size) / SAMPLE_RATE,
                level_dbfs=active_level_dbfs(piece * g),
            )
        )
        pos += piece.size
        add_silence(pause())

    signal = np.concatenate(chunks)
    signal = to_int16_grid(signal + noise_floor(rng, signal.size, noise_db, color))
    truth = [(s / SAMPLE_RATE, e / SAMPLE_RATE, lab) for s, e, lab in _merge(track)]
    return Conversation(
        a=a,
        b=b,
        c=c,
        enroll=enroll,
        enroll_files=enroll_files,
        signal=signal,
        truth=truth,
        turns=turns,
        noise_dbfs=noise_db,
        noise_color=color,
        reused_pieces=sum(src.reused for src in sources.values()),
    )
