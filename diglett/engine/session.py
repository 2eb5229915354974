"""The protocol's per-session state machine, free of Ray, FastAPI and torch.

`SessionEngine` consumes the client's frames in order and returns a list of
*actions*: messages to send (dicts), a `Close`, or embedding jobs
(`HopJob`, `EnrollJob`). The caller computes the jobs' embeddings however it
likes (batched, remote) and hands them back through `complete`, in order, to
get the `label` and `enrolled` messages. Keeping the embedding step outside
makes every protocol rule testable in milliseconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from diglett.engine import levels, speech
from diglett.engine.audio import AudioError, InputFormat, StreamResampler, check_format
from diglett.engine.audio import decode_frame
from diglett.engine.decision import (
    NOISE,
    SILENCE,
    Adaptation,
    EmbeddingSum,
    TalkStats,
    clear_win,
    clearly_nobody,
    closer_to_others,
    confident,
    score_drop,
    second_look,
)
from diglett.engine.decision import cosine_scores
from diglett.engine.decision import decide, enrollment_reference, normalize
from diglett.engine.decision import speaker_threshold
from diglett.engine.holdback import HoldRule
from diglett.engine.protocol import (
    CLOSE_CODES,
    EndMsg,
    EnrollEndMsg,
    EnrollMsg,
    FormatMsg,
)
from diglett.engine.protocol import ProtocolError, StreamMsg, error, parse_control
from diglett.settings import SAMPLE_RATE, Settings
from diglett.engine.windowing import HopWindower

# Enrollment warnings (tests/unit/test_speech.py checks them on real
# clips): the speech frames' level under QUIET_DBFS is `quiet` (the detector
# still finds such speech, but a louder enrollment scores better); more than
# CLIPPING_FRACTION of samples at full scale is `clipping`; speech less than
# NOISY_SNR_DB over the quietest tenth of frames (the floor in the pauses) is
# `noisy`, so a clip without a pause cannot show its floor and reads noisy.
QUIET_DBFS = -40.0
CLIPPING_FRACTION = 0.001
NOISY_SNR_DB = 15.0
ENROLL_WINDOWS_MAX = 16  # most sub-windows embedded per enrollment
HOLD_MAX_BYTES = 1 << 20  # most enrollment audio a caller holds back (hold_rule)
# A stream's background level (is_background) is the quieter tenth of the
# levels of its last FLOOR_SPAN_S in blocks of FLOOR_BLOCK_S, known once
# FLOOR_LEAST_S are. Blocks shorter than a hop find the background in the
# short gaps of a quick conversation, which no whole hop falls into
# (docs/accuracy.md).
FLOOR_SPAN_S = 40.0
FLOOR_LEAST_S = 3.0
FLOOR_BLOCK_S = 0.1
FLOOR_BLOCK = round(FLOOR_BLOCK_S * SAMPLE_RATE)
# Whether that background moves like talk (levels.BackgroundMotion) is read
# from its blocks within MOTION_WITHIN_DB of the floor, once MOTION_LEAST
# blocks are there.
MOTION_WITHIN_DB = 1.0
MOTION_LEAST = 10


@dataclass(frozen=True)
class Close:
    """Close the connection with this WebSocket code."""

    code: int


@dataclass
class HopJob:
    """A hop to label; `window` is None when no embedding of it is needed.

    `window` has shape (n,), float32 at 16 kHz, ending where the hop ends.
    It is the speech part of the window (`speech.speech_part_start`): a
    window that reaches back over a pause is cut there.
    `recv_t` is the caller's timestamp of the frame holding the hop's last
    sample, echoed back so latency is measured on one clock. `speech` is the
    detector's verdict on the hop itself. With look-ahead the window may
    end after the hop (`SessionEngine._hop_window`), and a silent hop
    carries one when talk resumes right after it (`fill`).
    """

    seq: int
    start_s: float
    end_s: float
    level_dbfs: float
    window: np.ndarray | None
    recv_t: float
    speech: bool = True
    # The detector's mean speech probability over the hop's speech frames
    # (speech.SpeechDetector.speech_confidence); None: not known.
    confidence: float | None = None
    # Look-ahead: a silent hop whose `window` is the talk that resumes
    # right after it; the hop is that talker's pause if they spoke last.
    fill: bool = False

    @property
    def audio(self) -> np.ndarray | None:
        return self.window


@dataclass
class LastPartJob:
    """The last `speech.PART_MIN_S` of a hop's window, to be embedded for a
    second look (`SessionEngine.followups`): the window's scores fell since
    the previous hop's, so a new talker may have taken over inside it.
    `hop` waits for it, with its window's `embedding` (d,)."""

    hop: HopJob
    embedding: np.ndarray
    audio: np.ndarray


@dataclass
class EnrollJob:
    """An accepted enrollment whose embedding is still to be computed."""

    speaker: str
    audio: np.ndarray
    duration_s: float
    speech_s: float
    level_dbfs: float
    warnings: list[str] = field(default_factory=list)
    # The whole clip is embedded only as the fallback reference, when the
    # enrollment gave fewer than two speech sub-windows.
    embed: bool = True


@dataclass
class EnrollWindowJob:
    """One window-length sub-window of an enrollment, to be embedded.

    They come right before their `EnrollJob`, in the same action list; the
    enrollment's reference is the centroid of their embeddings.
    """

    speaker: str
    index: int
    audio: np.ndarray


@dataclass(frozen=True)
class FrameFlags:
    """A detector's speech flags (k,) of frames of `frame` samples from
    sample `first` on."""

    first: int
    frame: int
    flags: np.ndarray

    def fraction(self, start: int, end: int) -> float:
        return speech.speech_fraction(self.first, self.frame, self.flags, start, end)


def clip_flags(x: np.ndarray, settings: Settings) -> FrameFlags:
    """Speech flags of a whole clip `x` (16 kHz), from a fresh detector
    that keeps all of its frames."""
    history_s = x.size / SAMPLE_RATE + 1.0
    det = speech.make_detector(settings.vad, settings.gate_dbfs, history_s)
    det.push(x)
    # Quiet speech, as in a stream (speech.QUIET_OVER_DB): a talker enrolling
    # softly in noise is heard.
    det.recheck_quiet(0, x, 0, clip_floor(x), settings.quiet_gain_db)
    first, flags = det.frame_flags(0, x)
    return FrameFlags(first, det.frame_samples, flags)


def clip_floor(x: np.ndarray) -> float | None:
    """A whole clip's background level, as a stream's (levels.RecentFloor):
    the quieter tenth of its `FLOOR_BLOCK_S` levels; None for a clip under
    a block."""
    block_levels = levels.frame_dbfs(
        x[: x.size // FLOOR_BLOCK * FLOOR_BLOCK], FLOOR_BLOCK
    )
    floor = levels.RecentFloor(span=max(1, block_levels.size), least=1)
    floor.extend(block_levels)
    return floor.floor()


def enrollment_windows(
    x: np.ndarray,
    settings: Settings,
    max_windows: int = ENROLL_WINDOWS_MAX,
    flags: FrameFlags | None = None,
) -> list[np.ndarray]:
    """The sub-windows of enrollment audio `x` (16 kHz) worth embedding.

    Windows of `window_s` every `hop_s` (as a stream's windows), keeping
    those whose speech share reaches `speech_min_frac`; at most
    `max_windows`, evenly spread. Fewer than two speech windows: none (the
    whole clip is the reference). `flags`: the clip's, if already known.
    """
    w, h = settings.window_samples, settings.hop_samples
    flags = flags or clip_flags(x, settings)
    wins = [
        x[end - w : end]
        for end in range(w, x.size + 1, h)
        if is_speech(flags.fraction(end - w, end), settings.speech_min_frac)
    ]
    if len(wins) < 2:
        return []
    if len(wins) > max_windows:
        keep = np.unique(np.round(np.linspace(0, len(wins) - 1, max_windows)))
        wins = [wins[int(i)] for i in keep]
    return wins


@dataclass(frozen=True)
class Summary:
    """Send the summary here, once the jobs before it have completed."""


Action = Union[dict, Close, HopJob, LastPartJob, EnrollWindowJob, EnrollJob, Summary]


def continues(run_start: int | None, hop_end: int) -> bool:
    """Whether a look-ahead window whose last speech run starts at sample
    `run_start` (None: no speech) continues the talk of the hop ending at
    `hop_end`: the run started by then. A run that starts later is whoever
    speaks after a pause, maybe the next talker (docs/accuracy.md)."""
    return run_start is not None and run_start <= hop_end


def is_speech(fraction: float, min_frac: float) -> bool:
    """A hop (or window) with this share of speech counts as speech."""
    return fraction > 0 and fraction >= min_frac


def is_background(
    confidence: float | None,
    settings: Settings,
    level_dbfs: float | None = None,
    floor_dbfs: float | None = None,
) -> bool:
    """Whether speech that matches no enrolled speaker is background.

    Babble, a television or voices across the room reach the detector as
    speech it is unsure of (its probabilities hover between the bar and
    certainty), where a talker of the conversation, enrolled or not, is
    near-certain speech; and they stay at the stream's background level
    (`floor_dbfs`, levels.RecentFloor), where a talker stands out of it.
    Such a hop is nobody of the conversation talking: `silence`, not
    `noise` (docs/accuracy.md measures both). Off with `background_prob`
    and `background_margin_db` 0; the first needs a detector with
    probabilities, the second a known floor.
    """
    if confidence is not None and confidence < settings.background_prob:
        return True
    return at_background_level(settings, level_dbfs, floor_dbfs)


def at_background_level(
    settings: Settings, level_dbfs: float | None, floor_dbfs: float | None
) -> bool:
    """Whether a hop at `level_dbfs` stands less than `background_margin_db`
    over the stream's background level `floor_dbfs` (None: not known yet;
    off with the margin at 0)."""
    return (
        settings.background_margin_db > 0
        and level_dbfs is not None
        and floor_dbfs is not None
        and level_dbfs - floor_dbfs < settings.background_margin_db
    )


def _power_mean_db(db: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(10 ** (db / 10))))


def enrollment_warnings(x: np.ndarray, flags: FrameFlags, truncated: bool) -> list[str]:
    """Advisory warnings for enrollment audio `x` (shape (n,), 16 kHz) whose
    speech frames are `flags` (see the constants above)."""
    warnings = ["truncated"] if truncated else []
    db = levels.frame_dbfs(x[flags.first :], flags.frame)[: flags.flags.size]
    sp = db[flags.flags[: db.size]]
    speech_db = _power_mean_db(sp) if sp.size else None
    if speech_db is None or speech_db < QUIET_DBFS:
        warnings.append("quiet")
    if levels.clipping_fraction(x) > CLIPPING_FRACTION:
        warnings.append("clipping")
    if speech_db is not None and speech_db - np.percentile(db, 10) < NOISY_SNR_DB:
        warnings.append("noisy")
    return warnings


class SessionEngine:
    """One session's protocol state: format, enrollments, stream, stats."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.fmt = InputFormat()
        self._resampler = StreamResampler(self.fmt.sample_rate)
        self.state = "idle"  # idle | enrolling | streaming | closed
        self.audio_flowed = False
        self._stray_answered = False
        self.enrollments: dict[str, np.ndarray | None] = {}
        self.self_scores: dict[str, float | None] = {}
        # Each speaker's reference as this session refines it (decision.py).
        self.adapted: dict[str, Adaptation] = {}
        # Speech that was clearly nobody enrolled (decision.clearly_nobody).
        self.others = EmbeddingSum()
        self._detector = speech.make_detector(settings.vad, settings.gate_dbfs)
        self._enroll_parts: dict[str, list[np.ndarray]] = {}
        self._enroll_name = ""
        self._enroll_chunks: list[np.ndarray] = []
        self._enroll_len = 0
        self._enroll_truncated = False
        self._windower: HopWindower | None = None
        # When the stream's audio arrived: (samples so far, the caller's
        # time), so that a hop handed over after look-ahead keeps the time
        # its last sample came (`_recv_t`).
        self._arrivals: deque[tuple[int, float]] = deque()
        self._received = 0
        self._last_label: str | None = None  # the stream's last label sent
        # Second look: the scores of the last hop's window (None after a
        # hop without one), and the actions waiting on a LastPartJob.
        self._prev_scores: dict[str, float] | None = None
        self._resume: tuple[list[Action], dict[int, np.ndarray]] | None = None
        self._followups: list[Action] = []
        self._floor = self._new_floor()
        self._motion = self._new_motion()
        self.stats = TalkStats()
        self._rate_t: float | None = None  # time of the last audio frame
        self._rate_tokens = settings.rate_burst_s  # seconds of audio allowed now

    # ----------------------------------------------------------------- input
    def on_text(self, text: str, t: float) -> list[Action]:
        """Handle one text frame received at time `t` (seconds, caller's clock)."""
        self._check_resolved()
        if self.state == "closed":
            return []
        self._stray_answered = False
        try:
            msg = parse_control(text)
            if isinstance(msg, FormatMsg):
                return self._on_format(msg)
            if isinstance(msg, EnrollMsg):
                return self._on_enroll(msg, t)
            if isinstance(msg, EnrollEndMsg):
                return self._on_enroll_end()
            if isinstance(msg, StreamMsg):
                return self._on_stream(t)
            if isinstance(msg, EndMsg):
                return self._on_end(t)
        except ProtocolError as exc:
            return [error(exc.code, exc.message)]
        raise AssertionError(f"unhandled message {msg!r}")

    def on_binary(self, data: bytes, t: float) -> list[Action]:
        """Handle one binary (audio) frame received at time `t`."""
        self._check_resolved()
        if self.state == "closed":
            return []
        if self.state not in ("enrolling", "streaming"):
            if self._stray_answered:
                return []
            self._stray_answered = True
            return [
                error(
                    "bad_message",
                    "audio outside an enrollment or a stream; "
                    "send 'enroll' or 'stream' first",
                )
            ]
        try:
            x = decode_frame(data, self.fmt)
        except AudioError as exc:
            return self._fail(exc.code, str(exc))
        if self._rate_exceeded(x.size / self.fmt.sample_rate, t):
            return self._fail(
                "rate_exceeded",
                f"audio arrives faster than {self.s.max_rate:g}x real time",
            )
        if x.size == 0:
            return []
        self.audio_flowed = True
        x16 = self._resampler.push(x)
        if self.state == "enrolling":
            self._add_enroll_audio(x16)
            return []
        self._detector.push(x16)
        self._arrived(x16.size, t)
        return self._hop_jobs(self._windower.push(x16), t)

    def disconnect(self) -> None:
        """The connection dropped: drop unfinished audio, keep enrollments."""
        self._resampler = StreamResampler(self.fmt.sample_rate)
        self.state = "idle"
        self._windower = None
        self._resume, self._followups = None, []
        self._enroll_chunks = []

    def reattach(self) -> None:
        """A new connection took over the session (resume).

        Format and stats are per connection; enrollments and the rate
        budget stay with the session, so reconnecting does not refill it.
        """
        self.fmt = InputFormat()
        self.disconnect()
        self.audio_flowed = False
        self.stats = TalkStats()
        self._stray_answered = False

    # ------------------------------------------------------------- batching
    def hold_rule(self) -> HoldRule:
        """What a caller may hold back before this session has anything new
        to answer (see diglett/engine/holdback.py): the audio still missing from the
        next hop while streaming (in the client's format, rounded down, less
        10 ms for the resampler's delay), `HOLD_MAX_BYTES` while enrolling
        (the audio is only needed at `enroll_end`), else nothing.
        """
        if self.state == "enrolling":
            return HoldRule(HOLD_MAX_BYTES, self.fmt)
        if self.state != "streaming" or self._windower is None:
            return HoldRule(0, self.fmt)
        missing16 = self._windower.missing
        rate = self.fmt.sample_rate
        missing = missing16 * rate // SAMPLE_RATE
        if rate != SAMPLE_RATE:
            missing -= rate // 100
        return HoldRule(max(0, missing) * self.fmt.bytes_per_sample, self.fmt)

    # ------------------------------------------------------------ completion
    @staticmethod
    def jobs(
        actions: list[Action],
    ) -> list[HopJob | LastPartJob | EnrollWindowJob | EnrollJob]:
        """The actions that need an embedding, in order."""
        return [
            a
            for a in actions
            if isinstance(a, (HopJob, LastPartJob, EnrollWindowJob, EnrollJob))
            and a.audio is not None
            and getattr(a, "embed", True)
        ]

    def finish(
        self, actions: list[Action], embeddings: list[np.ndarray]
    ) -> tuple[list[dict], int | None]:
        """Resolve `actions` in order, given the embeddings of `jobs(actions)`.

        Returns the messages to send and the close code (None: stay open).
        Resolving stops at a hop that needs a second look: `followups()`
        then holds the job to embed, and `finish(followups(), ...)` goes on
        where this call stopped. `run` does the whole loop.
        """
        by_job = {id(j): e for j, e in zip(self.jobs(actions), embeddings)}
        queue = list(actions)
        if self._resume is not None:
            rest, earlier = self._resume
            self._resume = None
            queue += rest
            by_job.update(earlier)
        out: list[dict] = []
        close: int | None = None
        for i, a in enumerate(queue):
            if isinstance(a, EnrollWindowJob):
                self._enroll_parts.setdefault(a.speaker, []).append(by_job[id(a)])
            elif isinstance(a, HopJob):
                part = self._last_part(a, by_job.get(id(a)))
                if part is not None:
                    self._followups = [part]
                    self._resume = (queue[i + 1 :], by_job)
                    break
                out.append(self._complete_hop(a, by_job.get(id(a))))
            elif isinstance(a, LastPartJob):
                out.append(self._complete_hop(a.hop, a.embedding, by_job[id(a)]))
            elif isinstance(a, EnrollJob):
                out.append(self.complete(a, by_job.get(id(a))))
            elif isinstance(a, Summary):
                out.append(self.stats.summary(list(self.enrollments)))
            elif isinstance(a, Close):
                close = a.code
            else:
                out.append(a)
        return out, close

    def followups(self) -> list[Action]:
        """The jobs the last `finish` stopped at (a `LastPartJob`), to embed
        and pass to `finish` next; [] once everything is resolved."""
        out, self._followups = self._followups, []
        return out

    def run(self, actions: list[Action], embed) -> tuple[list[dict], int | None]:
        """`finish` `actions` and their follow-ups, with `embed(jobs)` giving
        the embeddings (d,) of a list of jobs; returns the messages and the
        close code, as `finish`."""
        out: list[dict] = []
        close: int | None = None
        while actions:
            jobs = self.jobs(actions)
            msgs, code = self.finish(actions, embed(jobs) if jobs else [])
            out.extend(msgs)
            close = code if code is not None else close
            actions = self.followups()
        return out, close

    async def run_async(
        self, actions: list[Action], embed
    ) -> tuple[list[dict], int | None]:
        """`run` with `await embed(jobs)` (the SessionActor's model calls).
        If `embed` raises, the messages of this call are lost and the caller
        ends the connection (`disconnect` drops what was left)."""
        out: list[dict] = []
        close: int | None = None
        while actions:
            jobs = self.jobs(actions)
            msgs, code = self.finish(actions, await embed(jobs) if jobs else [])
            out.extend(msgs)
            close = code if code is not None else close
            actions = self.followups()
        return out, close

    def _check_resolved(self) -> None:
        if self._resume is not None:
            raise RuntimeError("finish the pending followups() before new input")

    def _last_part(
        self, job: HopJob, embedding: np.ndarray | None
    ) -> LastPartJob | None:
        """The second look a hop needs, if any: its window's scores fell by
        more than `change_drop` since the previous hop's window (a talker
        may have taken over inside it, with no pause to cut at), and its
        window is longer than the part. Not with look-ahead, whose window
        is centred on the hop."""
        n = int(round(speech.PART_MIN_S * SAMPLE_RATE))
        if (
            self.s.change_drop <= 0
            or self.s.lookahead_hops
            or embedding is None
            or job.window is None
            or job.window.size <= n
            or self._prev_scores is None
        ):
            return None
        scores, _, label, _ = self._window_label(job, embedding)
        if label == SILENCE or score_drop(self._prev_scores, scores) <= (
            self.s.change_drop
        ):
            return None
        return LastPartJob(job, embedding, job.window[-n:])

    def complete(self, job: HopJob | EnrollJob, embedding: np.ndarray | None) -> dict:
        """Turn a job and its embedding (shape (d,), or None) into its message."""
        if isinstance(job, EnrollJob):
            return self._complete_enroll(job, embedding)
        return self._complete_hop(job, embedding)

    def _complete_pause(self, hop: HopJob, embedding: np.ndarray | None) -> dict:
        """Label a silent `hop` (`fill`) that look-ahead sees between two
        stretches of one speaker: the hop before it was labelled that
        speaker and the talk resuming after it (`embedding`, of its window)
        is decided for them too (the session's others included, as
        `_complete_hop` decides). A pause inside a turn is that speaker's
        turn; any other silent hop is `silence`. The fill never adapts a
        reference or learns others.
        """
        last = self._last_label
        if embedding is not None and last in self.adapted:
            scores, bars, label = self._score(embedding)
            if label == last and not closer_to_others(
                embedding, self.others, scores[last], bars[last]
            ):
                return self._label_msg(hop, last, scores)
        return self._silence(hop)

    def _silence(self, job: HopJob) -> dict:
        """`silence` for a hop with no window to score; the next hop's
        second look then has no scores to compare with."""
        self._prev_scores = None
        return self._label_msg(job, SILENCE, None)

    def _complete_enroll(self, job: EnrollJob, embedding: np.ndarray) -> dict:
        parts = self._enroll_parts.pop(job.speaker, [])
        if len(parts) >= 2:
            ref, self_score = enrollment_reference(parts)
        else:  # too little speech for sub-windows: the whole clip
            ref, self_score = normalize(embedding), None
        self.set_reference(job.speaker, ref, self_score)
        return {
            "type": "enrolled",
            "speaker": job.speaker,
            "duration_s": round(job.duration_s, 3),
            "speech_s": round(job.speech_s, 3),
            "level_dbfs": round(job.level_dbfs, 1),
            "warnings": job.warnings,
        }

    def _complete_hop(
        self,
        job: HopJob,
        embedding: np.ndarray | None,
        last: np.ndarray | None = None,
    ) -> dict:
        """The label of `job` from its window's `embedding` (None: silence)
        and, after a second look, its last part's embedding `last` (d,)."""
        if job.fill:
            return self._complete_pause(job, embedding)
        if job.window is None or embedding is None:
            return self._silence(job)
        scores, bars, label, learn = self._window_label(job, embedding)
        self._prev_scores = scores
        if last is not None:
            last_scores, _, _ = self._score(last)
            looked = second_look(label, last_scores, bars)
            if looked != label:  # the window mixes two talkers: learn nothing
                label, scores, learn = looked, last_scores, None
                if label == NOISE and self._is_background(job):
                    label = SILENCE  # what was left of the talker was babble
        if self._faint_match(job, label, scores, bars):
            label = SILENCE
        if learn is not None:
            learn.add(embedding)
        return self._label_msg(job, label, scores)

    def _faint_match(
        self,
        job: HopJob,
        label: str,
        scores: dict[str, float],
        bars: dict[str, float],
    ) -> bool:
        """Whether a hop labelled a speaker is the stream's background after
        all: at its background level (`at_background_level`), short of a
        clear win over the speaker's bar. Babble that only brushes an
        enrolled voice is nobody of the conversation talking, as it is
        when it matches nobody (`is_background`); a talker who stands out
        of the background, or matches clearly, keeps the label. Such a
        window adapts nothing (`confident` asks for a clear win too)."""
        return (
            label in self.adapted
            and not clear_win(scores[label], bars[label])
            and at_background_level(self.s, job.level_dbfs, self._floor.floor())
            and self._background_moves()
        )

    def _window_label(self, job: HopJob, embedding: np.ndarray) -> tuple[
        dict[str, float],
        dict[str, float],
        str,
        Adaptation | EmbeddingSum | None,
    ]:
        """(scores, bars, label, what learns from the window) for a hop's
        window `embedding` (d,), by the rules of decision.py; the last is
        the speaker's adaptation, the session's others or None, and is left
        to the caller so that deciding changes nothing."""
        scores, bars, label = self._score(embedding)
        learn: Adaptation | EmbeddingSum | None = None
        if label == NOISE:
            if self._is_background(job):
                label = SILENCE
            elif clearly_nobody(scores, bars, job.confidence):
                learn = self.others
        elif closer_to_others(embedding, self.others, scores[label], bars[label]):
            label = NOISE
        elif confident(scores, bars, label):
            learn = self.adapted[label]
        return scores, bars, label, learn

    def _is_background(self, job: HopJob) -> bool:
        """Whether the speech of a hop that matches nobody enrolled is the
        stream's background (`is_background`): `silence`, not `noise`."""
        return self._background_moves() and is_background(
            job.confidence, self.s, job.level_dbfs, self._floor.floor()
        )

    def _background_moves(self) -> bool:
        """Whether the background rules hold: the stream's background
        moves like talk (levels.BackgroundMotion: babble, not a fan or
        hiss, whose level a quiet talker or an intruder barely clears, and
        where Silero is less sure of speech than in silence), or that is
        not known yet (the first seconds). Always with
        `background_motion_db` 0, and with the level gate, which takes
        steady noise over it for speech (the rules are what tells it
        apart there)."""
        if not self._motion_gates():
            return True
        spread = self._motion.spread_db(self._floor.floor())
        return spread is None or spread >= self.s.background_motion_db

    def _score(
        self, embedding: np.ndarray
    ) -> tuple[dict[str, float], dict[str, float], str]:
        """(scores, bars, label) of a window's embedding (d,) against each
        speaker's reference now: cosines, thresholds, and `decide`'s label."""
        refs = {k: a.reference for k, a in self.adapted.items()}
        scores = cosine_scores(embedding, refs)
        bars = self.thresholds()
        return scores, bars, decide(scores, bars)

    def _label_msg(
        self, job: HopJob, label: str, scores: dict[str, float] | None
    ) -> dict:
        """The `label` message of hop `job`; counts it in the summary."""
        msg = {
            "type": "label",
            "seq": job.seq,
            "start_s": round(job.start_s, 6),
            "end_s": round(job.end_s, 6),
            "label": label,
        }
        if scores is not None:
            msg["scores"] = {k: round(v, 4) for k, v in scores.items()}
        msg["level_dbfs"] = round(job.level_dbfs, 1)
        msg["_recv_t"] = job.recv_t
        self._last_label = label
        self.stats.add(label, job.end_s - job.start_s)
        return msg

    def set_reference(
        self, name: str, reference: np.ndarray, self_score: float | None
    ) -> None:
        """Enroll `name` with a unit `reference` (d,) and its self-score (a
        finished enrollment, or one restored); its adaptation starts anew."""
        self.enrollments[name] = reference
        self.self_scores[name] = self_score
        self.adapted[name] = Adaptation(reference)
        self.others = EmbeddingSum()  # "nobody enrolled" has changed

    def thresholds(self) -> dict[str, float]:
        """Each enrolled speaker's cosine bar (see decision.speaker_threshold)."""
        return {
            name: speaker_threshold(
                self.self_scores.get(name), self.s.rel_threshold, self.s.threshold
            )
            for name in self.enrollments
        }

    # -------------------------------------------------------------- messages
    def _on_format(self, msg: FormatMsg) -> list[Action]:
        if self.audio_flowed:
            raise ProtocolError(
                "bad_message", "format must come before the first audio frame"
            )
        try:
            self.fmt = check_format(msg.sample_rate, msg.encoding)
        except AudioError as exc:
            return [error(exc.code, str(exc))]
        self._resampler = StreamResampler(self.fmt.sample_rate)
        return [
            {
                "type": "format_ok",
                "sample_rate": self.fmt.sample_rate,
                "encoding": self.fmt.encoding,
            }
        ]

    def _on_enroll(self, msg: EnrollMsg, t: float) -> list[Action]:
        if self.state == "enrolling":
            raise ProtocolError(
                "bad_message",
                f"the enrollment of {self._enroll_name!r} is still open; "
                "send 'enroll_end' first",
            )
        if msg.speaker not in self.enrollments and (
            len(self.enrollments) >= self.s.max_speakers
        ):
            return [
                error(
                    "too_many_speakers",
                    f"at most {self.s.max_speakers} speakers; "
                    f"enrolled: {sorted(self.enrollments)}",
                )
            ]
        actions = self._end_stream(t) if self.state == "streaming" else []
        self.state = "enrolling"
        self._enroll_name = msg.speaker
        self._enroll_chunks, self._enroll_len = [], 0
        self._enroll_truncated = False
        return actions

    def _on_enroll_end(self) -> list[Action]:
        if self.state != "enrolling":
            raise ProtocolError("bad_message", "'enroll_end' without an open 'enroll'")
        self._add_enroll_audio(self._resampler.flush())
        audio = (
            np.concatenate(self._enroll_chunks)
            if self._enroll_chunks
            else np.zeros(0, dtype=np.float32)
        )
        name, truncated = self._enroll_name, self._enroll_truncated
        self.state = "idle"
        self._enroll_chunks, self._enroll_len = [], 0
        duration = audio.size / SAMPLE_RATE
        flags = clip_flags(audio, self.s)
        speech_s = speech.speech_seconds(flags.frame, flags.flags)
        if duration < self.s.enroll_min_s or speech_s < self.s.enroll_min_speech_s:
            return [
                error(
                    "enroll_too_short",
                    f"{name!r}: {duration:.2f} s of audio with {speech_s:.2f} s of "
                    f"speech; need {self.s.enroll_min_s:g} s of audio and "
                    f"{self.s.enroll_min_speech_s:g} s of speech",
                )
            ]
        if name not in self.enrollments:
            self.enrollments[name] = None  # its embedding arrives with `complete`
        self._enroll_parts.pop(name, None)
        windows = [
            EnrollWindowJob(name, i, w)
            for i, w in enumerate(enrollment_windows(audio, self.s, flags=flags))
        ]
        return windows + [
            EnrollJob(
                speaker=name,
                audio=audio,
                embed=not windows,
                duration_s=duration,
                speech_s=speech_s,
                level_dbfs=levels.rms_dbfs(audio),
                warnings=enrollment_warnings(audio, flags, truncated),
            )
        ]

    def _on_stream(self, t: float) -> list[Action]:
        if self.state == "enrolling":
            raise ProtocolError(
                "bad_message",
                f"the enrollment of {self._enroll_name!r} is still open; "
                "send 'enroll_end' first",
            )
        if not self.enrollments:
            return [
                error("not_enrolled", "enroll at least one speaker before 'stream'")
            ]
        actions = self._end_stream(t) if self.state == "streaming" else []
        self._windower = HopWindower(
            self.s.hop_samples, self.s.window_samples, self.s.lookahead_samples
        )
        self._detector.reset()
        self._arrivals, self._received = deque(), 0
        self._last_label = None
        self._prev_scores = None
        self._floor = self._new_floor()
        self._motion = self._new_motion()
        self.state = "streaming"
        return actions

    def _on_end(self, t: float) -> list[Action]:
        actions = self._end_stream(t) if self.state == "streaming" else []
        self.state = "closed"
        return actions + [Summary(), Close(1000)]

    # --------------------------------------------------------------- helpers
    def _end_stream(self, t: float) -> list[Action]:
        """Label what remains of the stream, ending with a shorter hop."""
        rest = self._resampler.flush()
        self._detector.push(rest)
        self._arrived(rest.size, t)
        hops = self._windower.push(rest) + self._windower.drain()
        last = self._windower.flush()
        if last is not None:
            hops.append(last)
        self._windower = None
        self.state = "idle"
        return self._hop_jobs(hops, t)

    def _hop_jobs(self, hops, t: float) -> list[Action]:
        jobs: list[Action] = []
        floor = self._floor.floor()
        for hop in hops:
            det = self._detector
            # The look-ahead is read too, so it is rechecked with the hop.
            window = hop.window if hop.ahead_window is None else hop.ahead_window
            det.recheck_quiet(
                hop.ahead_end - window.size,
                window,
                hop.start,
                floor,
                self.s.quiet_gain_db,
            )
            is_sp = self._is_speech(hop.start, hop.hop_audio)
            fill = not is_sp and self._resumes(hop)
            jobs.append(
                HopJob(
                    seq=hop.seq,
                    start_s=hop.start / SAMPLE_RATE,
                    end_s=hop.end / SAMPLE_RATE,
                    level_dbfs=levels.rms_dbfs(hop.hop_audio),
                    window=self._hop_window(hop, fill) if is_sp or fill else None,
                    recv_t=self._recv_t(hop.end, t),
                    speech=is_sp,
                    confidence=det.speech_confidence(hop.start, hop.end),
                    fill=fill,
                )
            )
            block_levels = levels.frame_dbfs(hop.hop_audio, FLOOR_BLOCK)
            self._floor.extend(block_levels)
            if self._motion_gates():
                self._motion.extend(hop.hop_audio, FLOOR_BLOCK, block_levels)
        return jobs

    def _new_floor(self) -> levels.RecentFloor:
        """A stream's background level, over its last `FLOOR_SPAN_S`."""
        return levels.RecentFloor(
            round(FLOOR_SPAN_S / FLOOR_BLOCK_S), round(FLOOR_LEAST_S / FLOOR_BLOCK_S)
        )

    def _motion_gates(self) -> bool:
        """Whether the background's motion gates the background rules
        (`_background_moves`), so that it is worth measuring."""
        return self.s.background_motion_db > 0 and self.s.vad == "silero"

    def _new_motion(self) -> levels.BackgroundMotion:
        """Whether a stream's background moves like talk, over the same
        span as its floor."""
        return levels.BackgroundMotion(
            round(FLOOR_SPAN_S / FLOOR_BLOCK_S), MOTION_LEAST, MOTION_WITHIN_DB
        )

    def _hop_window(self, hop, fill: bool) -> np.ndarray:
        """The part of a window that labels `hop`, shape (m,): with
        look-ahead, of the window ending after the hop where the talk goes
        on into it (`continues`) or, for a silent hop (`fill`), resumes;
        else of the hop's own window."""
        if hop.ahead_window is not None:
            part, run = self._speech_part(hop.ahead_window, hop.ahead_end)
            if fill or continues(run, hop.end):
                return part
        return self._speech_part(hop.window, hop.end)[0]

    def _resumes(self, hop) -> bool:
        """Whether talk resumes in the look-ahead after `hop` (as much of
        it speech as a hop needs); False without look-ahead."""
        if hop.ahead_end <= hop.end:
            return False
        return self._is_speech(hop.end, hop.ahead_window[hop.end - hop.ahead_end :])

    def _is_speech(self, start: int, audio: np.ndarray) -> bool:
        """Whether `audio` (n,), from stream sample `start`, holds as much
        speech as a hop needs (`speech_min_frac`, `is_speech`)."""
        det = self._detector
        first, flags = det.frame_flags(start, audio)
        frac = speech.speech_fraction(
            first, det.frame_samples, flags, start, start + audio.size
        )
        return is_speech(frac, self.s.speech_min_frac)

    def _speech_part(
        self, window: np.ndarray, end: int
    ) -> tuple[np.ndarray, int | None]:
        """`window` (ending at sample `end`) from where its last run of
        speech starts (`speech.speech_part_start`), shape (m,), m <= the
        window's length; and that run's start sample (None: no speech)."""
        det = self._detector
        w_start = end - window.size
        first, flags = det.frame_flags(w_start, window)
        run = speech.last_run_start(
            first, det.frame_samples, flags, speech.gap_frames(det.frame_samples)
        )
        start = speech.speech_part_start(w_start, end, run, det.frame_samples)
        return window[start - w_start :], run

    def _arrived(self, n: int, t: float) -> None:
        """Count `n` more stream samples (16 kHz), received at time `t`."""
        if n:
            self._received += n
            self._arrivals.append((self._received, t))

    def _recv_t(self, end: int, t: float) -> float:
        """When the stream's sample `end - 1` arrived (`t`: now, if unknown);
        forgets what earlier hops needed."""
        while len(self._arrivals) > 1 and self._arrivals[0][0] < end:
            self._arrivals.popleft()
        if self._arrivals and self._arrivals[0][0] >= end:
            return self._arrivals[0][1]
        return t

    def _add_enroll_audio(self, x: np.ndarray) -> None:
        room = int(self.s.enroll_max_s * SAMPLE_RATE) - self._enroll_len
        if x.size > room:
            self._enroll_truncated = True
            x = x[: max(0, room)]
        if x.size:
            self._enroll_chunks.append(x)
            self._enroll_len += x.size

    def _rate_exceeded(self, seconds: float, t: float) -> bool:
        """Token bucket: `max_rate` s of audio per second, `rate_burst_s` deep."""
        if self.s.max_rate <= 0:
            return False
        if self._rate_t is not None:
            refill = self.s.max_rate * max(0.0, t - self._rate_t)
            self._rate_tokens = min(self.s.rate_burst_s, self._rate_tokens + refill)
        self._rate_t = t
        self._rate_tokens -= seconds
        return self._rate_tokens < 0

    def _fail(self, code: str, message: str) -> list[Action]:
        """An error; fatal codes also close the connection."""
        if code in CLOSE_CODES:
            self.state = "closed"
            return [error(code, message), Close(CLOSE_CODES[code])]
        return [error(code, message)]
