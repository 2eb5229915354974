"""client/session.py's Connection against a tiny in-process WebSocket server."""

from __future__ import annotations

import asyncio
import json

import pytest

from client.session import ClientError, Connection


async def _with_server(handler, body):
    """Run `body(url)` against a WebSocket server on a free local port."""
    from websockets.asyncio.server import serve

    async with serve(handler, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        return await body(f"ws://127.0.0.1:{port}/v1/stream")


def test_ready_timeout_is_the_callers():
    """A server that accepts but never sends `ready` fails the open after
    `ready_timeout_s`, not the default minute."""

    async def silent(ws):
        await ws.wait_closed()

    async def body(url):
        conn = Connection(url, "", print, print, ready_timeout_s=0.2)
        with pytest.raises(ClientError, match="valid `ready`"):
            await asyncio.wait_for(conn.open(), 10)
        await conn.close()

    asyncio.run(_with_server(silent, body))


def test_labels_reach_on_label_and_the_summary_a_reply():
    async def server(ws):
        await ws.send(json.dumps({"type": "ready", "hop_s": 0.5}))
        assert json.loads(await ws.recv())["type"] == "end"
        await ws.send(json.dumps({"type": "label", "seq": 0}))
        await ws.send(json.dumps({"type": "summary", "labels": 1}))

    async def body(url):
        labels = []
        conn = Connection(url, "", labels.append, print, open_timeout_s=5)
        ready = await conn.open()
        await conn.send_json({"type": "end"})
        summary = await conn.reply(timeout=5)
        await conn.close()
        return ready, labels, summary

    ready, labels, summary = asyncio.run(_with_server(server, body))
    assert ready["hop_s"] == 0.5
    assert labels == [{"type": "label", "seq": 0}]
    assert summary == {"type": "summary", "labels": 1}
