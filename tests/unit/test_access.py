"""Access rules in milliseconds: where secrets come from, how logs redact
them, and that no secret reaches a SessionActor's spec."""

from __future__ import annotations

import logging
import pickle

from diglett.engine.access import (
    REDACTED,
    accepted_subprotocol,
    given_resume_token,
    given_token,
    redact,
)
from diglett.logging_setup import RedactFilter
from diglett.settings import Settings

API = "api-Secret_123"
RESUME = "rT0k-en_abcdefghijklmnopqrstuvwxyz012345"


def test_api_token_from_header_subprotocol_or_query():
    assert given_token({"authorization": f"Bearer {API}"}, {}) == API
    assert given_token({"authorization": f"bearer  {API} "}, {}) == API
    proto = {"sec-websocket-protocol": f"diglett.v1, diglett.token.{API}"}
    assert given_token(proto, {}) == API
    assert given_token({}, {"token": API}) == API
    assert given_token({}, {}) == ""
    # The header wins over the URL: a logged URL never outranks a header.
    assert given_token({"authorization": f"Bearer {API}"}, {"token": "x"}) == API


def test_resume_token_from_header_subprotocol_or_query():
    assert given_resume_token({"x-diglett-resume-token": RESUME}, {}) == RESUME
    proto = {"sec-websocket-protocol": f"diglett.v1, diglett.resume.{RESUME}"}
    assert given_resume_token(proto, {}) == RESUME
    assert given_resume_token({}, {"resume_token": RESUME}) == RESUME
    assert given_resume_token({}, {}) == ""


def test_the_server_answers_the_subprotocol_only_when_offered():
    offered = {"sec-websocket-protocol": f"diglett.token.{API}, diglett.v1"}
    assert accepted_subprotocol(offered) == "diglett.v1"
    assert accepted_subprotocol({}) is None
    assert accepted_subprotocol({"sec-websocket-protocol": "chat"}) is None


def test_redact_query_secrets_in_any_form():
    line = f"GET /v1/stream?session=ab12&resume_token={RESUME}&token={API} 101"
    out = redact(line)
    assert RESUME not in out and API not in out
    assert "session=ab12" in out and out.count(REDACTED) == 2
    assert API not in redact(f"/v1/stream%3Ftoken%3D{API}%26x=1")
    assert API not in redact(f"ws://h/v1/stream;token={API}")
    assert redact("tokens=3 and a token of trust") == "tokens=3 and a token of trust"


def test_log_records_are_redacted_in_message_and_arguments():
    f = RedactFilter()
    rec = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "WS %s from ?token=" + API,
        ("/?token=" + API,),
        None,
    )
    assert f.filter(rec)
    assert API not in rec.getMessage() and REDACTED in rec.getMessage()


def test_no_secret_in_a_session_actors_constructor_arguments():
    """The GCS keeps every actor's spec (and with fault tolerance, Redis
    does): neither the API token nor the resume token may be in it."""
    from actors.session_actor import session_actor_args, token_digest

    settings = Settings(api_token=API)
    args = session_actor_args(settings, ("app", "dep"), "sid", RESUME)
    blob = pickle.dumps(args)
    assert API.encode() not in blob and RESUME.encode() not in blob
    assert args[0].api_token == "" and args[3] == token_digest(RESUME)
    assert args[0].max_sessions == settings.max_sessions  # the rest is kept


def test_without_a_token_the_server_listens_on_this_machine_only():
    assert Settings().bind_host() == "127.0.0.1"
    assert Settings(api_token=API).bind_host() == "0.0.0.0"
    assert Settings(host="10.0.0.5").bind_host() == "10.0.0.5"
    assert Settings().open_without_token() == ""
    assert "DIGLETT_ALLOW_OPEN" in Settings(host="0.0.0.0").open_without_token()
    assert Settings(host="0.0.0.0", allow_open=1).open_without_token() == ""
    assert Settings(host="0.0.0.0", api_token=API).open_without_token() == ""


def test_diglett_serve_renders_the_bind_host_and_refuses_an_open_server(
    monkeypatch, capsys
):
    from pathlib import Path

    from serve_app import cli

    config = Path(__file__).resolve().parents[2] / "cluster" / "serve.yaml"
    rendered = cli.render_config(config, Settings(), gpus=0)
    assert rendered["http_options"]["host"] == "127.0.0.1"
    rendered = cli.render_config(config, Settings(api_token=API), gpus=0)
    assert rendered["http_options"]["host"] == "0.0.0.0"
    monkeypatch.setenv("DIGLETT_HOST", "0.0.0.0")
    monkeypatch.delenv("DIGLETT_API_TOKEN", raising=False)
    monkeypatch.delenv("DIGLETT_ALLOW_OPEN", raising=False)
    assert cli.main(["serve"]) == 2  # before anything starts
    assert "DIGLETT_ALLOW_OPEN=1" in capsys.readouterr().err
