"""bench/cv_decision.py's tables: the fresh draw sits beside the defaults."""

from __future__ import annotations

from bench import cv_decision as cvd


def _result(fresh: bool) -> dict:
    groups = {"condition": {"babble": 0.9, "clean": 0.98}}
    res = {
        "cv": {
            "folds": [
                {"fold": str(f), "accuracy": a} for f, a in enumerate((0.95, 0.97))
            ],
            "groups": groups,
        },
        "held": {"accuracy": 0.94},
    }
    if fresh:
        res["fresh"] = {
            "seed": 7,
            "cv_folds": [0.93, 0.96],
            "held": 0.925,
            "groups": {"condition": {"babble": 0.85, "clean": 0.99}},
        }
    return res


def _row(md: str, start: str) -> list[str]:
    rows = [r for r in md.splitlines() if r.startswith(f"| {start}")]
    assert len(rows) == 1, (start, md)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_the_fresh_draw_has_its_own_row_and_condition_figures():
    md = cvd.markdown(_result(fresh=True))
    assert _row(md, "the same, a fresh draw (seed 7)")[1:] == [
        "93.0 %",
        "96.0 %",
        "**94.5 %**",
        "93.0 %",
        "92.5 %",
    ]
    assert _row(md, "a fresh draw (seed 7)")[1:] == ["85.0 %", "99.0 %"]
    # the defaults' own rows are unchanged by it
    assert _row(md, "new defaults (cross-validated)")[-1] == "94.0 %"
    assert _row(md, "new defaults |")[1:] == ["90.0 %", "98.0 %"]


def test_no_fresh_row_without_a_fresh_draw():
    assert "fresh draw" not in cvd.markdown(_result(fresh=False))


def test_a_method_without_figures_for_a_split_gets_no_row():
    res = _result(fresh=False)
    today = {"cv_folds": [0.8, 0.82], "held": 0.84, "groups": {"corpus": {}}}
    md = cvd.markdown(res, today)
    assert _row(md, "before (energy gate")[-1] == "84.0 %"
    assert "| before |" not in md  # no condition figures: no row of dashes
