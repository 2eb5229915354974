"""What the client shows and writes: live label lines, timeline files, a plot."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from client.audio import level_bar

COLOURS = ["\033[36m", "\033[35m", "\033[33m", "\033[34m"]  # cyan, magenta, ...
GREY, RED, BOLD, RESET = "\033[90m", "\033[31m", "\033[1m", "\033[0m"
PLOT_COLOURS = ["#1f9bd1", "#d1417a", "#e0a020", "#4a5bd1"]


def use_colour(stream=sys.stdout) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


class Timeline:
    """Labels on one clock across reconnects, talk time, and the summary."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.talk_s: dict[str, float] = {}
        self.speakers: list[str] = []
        self.offset_s = 0.0  # added to a label's times (a resumed stream restarts at 0)
        self.summary: dict | None = None
        self.session_id: str | None = None
        self.reconnects = 0

    def add(self, m: dict) -> dict:
        row = {
            "start_s": round(m["start_s"] + self.offset_s, 3),
            "end_s": round(m["end_s"] + self.offset_s, 3),
            "label": m["label"],
            "level_dbfs": m.get("level_dbfs"),
            "scores": m.get("scores", {}),
            "latency_ms": m.get("latency_ms"),
        }
        self.rows.append(row)
        dur = row["end_s"] - row["start_s"]
        self.talk_s[row["label"]] = round(self.talk_s.get(row["label"], 0.0) + dur, 3)
        return row

    @property
    def end_s(self) -> float:
        return self.rows[-1]["end_s"] if self.rows else self.offset_s

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".csv":
            names = self.speakers or sorted({k for r in self.rows for k in r["scores"]})
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(
                    ["start_s", "end_s", "label", "level_dbfs"]
                    + [f"score_{n}" for n in names]
                    + ["latency_ms"]
                )
                for r in self.rows:
                    w.writerow(
                        [r["start_s"], r["end_s"], r["label"], r["level_dbfs"]]
                        + [r["scores"].get(n, "") for n in names]
                        + [r["latency_ms"]]
                    )
        else:
            doc = {
                "session_id": self.session_id,
                "speakers": self.speakers,
                "labels": self.rows,
                "talk_s": self.talk_s,
                "server_summary": self.summary,
                "reconnects": self.reconnects,
            }
            path.write_text(json.dumps(doc, indent=1))

    def plot(self, path: Path) -> None:
        """Speaker bands over time above the level curve, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(self.speakers) + ["noise", "silence"]
        for r in self.rows:
            if r["label"] not in names:
                names.insert(len(self.speakers), r["label"])
        colours = {n: PLOT_COLOURS[i % 4] for i, n in enumerate(self.speakers)}
        colours.update(noise="#999999", silence="#dddddd")
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(10, 4), sharex=True, height_ratios=[1, 1.4]
        )
        for i, n in enumerate(names):
            spans = [
                (r["start_s"], r["end_s"] - r["start_s"])
                for r in self.rows
                if r["label"] == n
            ]
            top.broken_barh(spans, (i - 0.4, 0.8), color=colours.get(n, "#55aa55"))
        top.set_yticks(range(len(names)), names)
        top.set_ylim(-0.6, len(names) - 0.4)
        top.invert_yaxis()
        top.set_title("Diglett: who speaks")
        xs, ys = [], []
        for r in self.rows:
            xs += [r["start_s"], r["end_s"]]
            ys += [r["level_dbfs"], r["level_dbfs"]]
        bottom.plot(xs, ys, color="#333333", linewidth=1)
        bottom.set_ylabel("level (dBFS)")
        bottom.set_xlabel("time (s)")
        bottom.set_ylim(-100, 0)
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


class Display:
    """Prints one line per label, and messages, to the terminal."""

    def __init__(self, timeline: Timeline, out=sys.stdout) -> None:
        self.t = timeline
        self.out = out
        self.colour = use_colour(out)

    def _c(self, text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if self.colour else text

    def colour_of(self, label: str) -> str:
        if label in self.t.speakers:
            return COLOURS[self.t.speakers.index(label) % len(COLOURS)] + BOLD
        return GREY

    def label(self, row: dict) -> None:
        scores = "  ".join(f"{k} {v:+.2f}" for k, v in row["scores"].items())
        talk = "  ".join(
            f"{n} {self.t.talk_s.get(n, 0.0):.1f}s" for n in self.t.speakers
        )
        db = row["level_dbfs"] if row["level_dbfs"] is not None else -120.0
        line = (
            f"{row['start_s']:7.1f}s  "
            + self._c(f"{row['label']:<10}", self.colour_of(row["label"]))
            + f" {level_bar(db, 16)} {db:6.1f} dBFS  {scores:<28}  talk: {talk}"
        )
        print(line, file=self.out, flush=True)

    def info(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        print(self._c(text, RED), file=sys.stderr, flush=True)

    def summary(self) -> None:
        total = sum(self.t.talk_s.values()) or 1.0
        self.info("summary (talk time):")
        order = self.t.speakers + sorted(set(self.t.talk_s) - set(self.t.speakers))
        for n in order:
            s = self.t.talk_s.get(n, 0.0)
            bar = "█" * int(round(30 * s / total))
            self.info(f"  {n:<12} {s:7.1f} s  {100 * s / total:5.1f}%  {bar}")
        if self.t.summary is not None:
            self.info(
                f"server summary: {self.t.summary.get('labels')} labels, "
                f"{self.t.summary.get('audio_s')} s of audio, talk_s "
                f"{json.dumps(self.t.summary.get('talk_s', {}))}"
            )
