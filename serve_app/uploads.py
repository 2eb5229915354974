"""`POST /v1/embeddings`: a WAV upload read, capped, decoded and embedded.

Apart from the ingress so that the route there stays a few lines; the
response models and the error replies live here because both the route and
its OpenAPI description use them.
"""

# No `from __future__ import annotations`: FastAPI reads these models'
# annotations at run time.

import asyncio

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from diglett.engine import levels
from diglett.engine.audio import AudioError, decode_wav
from diglett.model.embedder import EMBEDDING_DIM


class EmbeddingOut(BaseModel):
    embedding: list[float]
    dim: int
    duration_s: float
    level_dbfs: float


class ErrorOut(BaseModel):
    code: str
    message: str


def upload_cap(max_upload_s: float) -> int:
    """Most bytes a `/v1/embeddings` body may have: `max_upload_s` of the
    largest WAV accepted (96 kHz, 8 channels, 32-bit), plus 1 MB of headers
    and multipart framing."""
    return int(max_upload_s * 96000 * 8 * 4) + 1_000_000


def bad(status: int, code: str, message: str) -> JSONResponse:
    """An error reply in the protocol's `{code, message}` shape."""
    return JSONResponse({"code": code, "message": message}, status_code=status)


def unauthorized() -> JSONResponse:
    return bad(401, "unauthorized", "missing or wrong API token")


async def _read_capped(request: Request, cap: int) -> bytes | None:
    """The body, or None once it passes `cap` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def embed_upload(request: Request, max_upload_s: float, embedder):
    """The route's reply: the embedding of the uploaded WAV, or an error.

    `embedder` is the EmbeddingDeployment's handle. Decoding runs in a
    thread, off the replica's event loop.
    """
    cap = upload_cap(max_upload_s)
    body = await _read_capped(request, cap)
    if body is None:
        return bad(413, "too_long", f"upload larger than {cap} bytes")
    data = body
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        request._body = body  # let Starlette parse what we already read
        try:
            form = await request.form()
        except Exception as exc:
            return bad(400, "bad_audio", f"unreadable multipart body: {exc}")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return bad(400, "bad_audio", "multipart field 'file' is missing")
        data = await upload.read()
    try:
        audio, duration = await asyncio.to_thread(decode_wav, data, max_upload_s)
    except AudioError as exc:
        return bad(413 if exc.code == "too_long" else 400, exc.code, str(exc))
    [emb] = await embedder.embed.remote([audio])
    return {
        "embedding": np.asarray(emb, dtype=float).tolist(),
        "dim": EMBEDDING_DIM,
        "duration_s": round(duration, 4),
        "level_dbfs": round(levels.rms_dbfs(audio), 2),
    }
