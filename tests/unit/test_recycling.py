"""Recycled SessionActors: their sessions' ids, the setting, and which
idle ones the warm pool ends (actors/session_actor.py, serve_app/pool.py)."""

from actors.session_actor import actor_name, recycled_session_id


def test_each_session_of_a_recycled_actor_has_its_own_id_naming_that_actor():
    first = "3f9c" * 8
    ids = [first]
    for _ in range(3):
        ids.append(recycled_session_id(ids[-1]))
    assert ids[1:] == [f"{first}.1", f"{first}.2", f"{first}.3"]
    assert {actor_name(s) for s in ids} == {f"session-{first}"}


def test_a_client_supplied_id_names_at_most_one_actor():
    # Resume looks actors up by the client's `session` parameter.
    assert actor_name("abc.7.9") == "session-abc"
    assert actor_name("") == "session-"


def test_recycling_is_a_setting():
    import pytest

    from diglett.settings import Settings

    assert Settings.from_env({}).session_recycle == 1
    assert Settings.from_env({"DIGLETT_SESSION_RECYCLE": "0"}).session_recycle == 0
    with pytest.raises(ValueError, match="DIGLETT_SESSION_RECYCLE"):
        Settings.from_env({"DIGLETT_SESSION_RECYCLE": "2"})


def test_the_pool_ends_only_long_unused_actors_beyond_its_size():
    from serve_app.pool import POOL_TRIM_S, pool_excess

    now = 1000.0
    old, new = now - POOL_TRIM_S - 1, now - 1
    # Within its size, nothing ends however old.
    assert pool_excess([old, old], 2, now) == []
    # Beyond it, the unused ones, from the back, down to its size.
    assert pool_excess([new, old, old, old], 2, now) == [3, 2]
    assert pool_excess([old, new, old, new], 2, now) == [2, 0]
    # Recently pooled ones stay, even beyond its size.
    assert pool_excess([new, new, new], 1, now) == []
    assert pool_excess([], 0, now) == []
