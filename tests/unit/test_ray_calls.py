"""bench/ray_calls.py's counting, and the switch that turns task events on
for it (off when serving)."""

from __future__ import annotations

import os
from types import SimpleNamespace

from bench.ray_calls import count_calls, short_class
from conftest import fresh_python


def _task(tid, name, actor="", parent="", kind="ACTOR_TASK", at=1000):
    return SimpleNamespace(
        task_id=tid,
        name=name,
        actor_id=actor,
        parent_task_id=parent,
        type=kind,
        creation_time_ms=at,
    )


def test_calls_are_counted_by_caller_and_callee_in_the_window():
    classes = {
        "i": "ServeReplica:diglett:Ingress",
        "s": "SessionActor",
        "b": "EmbedBatcher",
    }
    tasks = [
        _task(
            "ic",
            "SERVE_REPLICA::x:ServeReplica:diglett:Ingress.__init__",
            "i",
            kind="ACTOR_CREATION_TASK",
            at=1,
        ),
        _task("h1", "SessionActor.handle", "s", parent="ic"),
        _task("h2", "SessionActor.handle", "s", parent="ic", at=1999),
        _task("e1", "EmbedBatcher.embed", "b", parent="h1"),
        _task("late", "SessionActor.handle", "s", parent="ic", at=2000),
        _task("early", "SessionActor.handle", "s", parent="ic", at=999),
        _task("d", "f", kind="NORMAL_TASK"),
        _task("w", "SessionActor.warm", "s", parent="d"),
        _task("u", "SessionActor.touch", "s", parent="gone"),
    ]
    assert count_calls(tasks, classes, 1000, 2000) == {
        ("Ingress", "SessionActor.handle"): 2,
        ("SessionActor", "EmbedBatcher.embed"): 1,
        ("driver", "SessionActor.warm"): 1,
        ("?", "SessionActor.touch"): 1,
    }
    assert short_class("ServeReplica:diglett:EmbeddingDeployment") == (
        "EmbeddingDeployment"
    )


def _task_events(env: dict) -> str:
    code = (
        "from actors.session_actor import SessionActor; "
        "from actors.embed_batcher import EmbedBatcher; "
        "print(SessionActor._default_options['enable_task_events'], "
        "EmbedBatcher._default_options['enable_task_events'])"
    )
    return fresh_python(code, env)


def test_task_events_are_off_unless_a_measurement_turns_them_on():
    env = {k: v for k, v in os.environ.items() if k != "DIGLETT_RAY_TASK_EVENTS"}
    assert _task_events(env) == "False False"
    assert _task_events({**env, "DIGLETT_RAY_TASK_EVENTS": "1"}) == "True True"
