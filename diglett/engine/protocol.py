"""Protocol v1 control messages: parsing, validation and error replies.

`parse_control` turns one text frame into a typed message or raises
`ProtocolError` carrying the protocol's error code, so the session logic
never sees malformed input.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter
from pydantic import ValidationError

from diglett.engine.decision import RESERVED_LABELS

MAX_TEXT_BYTES = 64 * 1024
MAX_NAME_LEN = 64


class ProtocolError(Exception):
    """An offending message; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Msg(BaseModel):
    # Unknown fields are ignored, as the protocol requires of both sides.
    model_config = ConfigDict(extra="ignore", frozen=True)


class FormatMsg(_Msg):
    type: Literal["format"]
    sample_rate: StrictInt
    encoding: StrictStr = "pcm_s16le"


class EnrollMsg(_Msg):
    type: Literal["enroll"]
    speaker: StrictStr


class EnrollEndMsg(_Msg):
    type: Literal["enroll_end"]


class StreamMsg(_Msg):
    type: Literal["stream"]


class EndMsg(_Msg):
    type: Literal["end"]


ControlMsg = Annotated[
    Union[FormatMsg, EnrollMsg, EnrollEndMsg, StreamMsg, EndMsg],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter = TypeAdapter(ControlMsg)
KNOWN_TYPES = ("format", "enroll", "enroll_end", "stream", "end")


def parse_control(
    text: str,
) -> FormatMsg | EnrollMsg | EnrollEndMsg | StreamMsg | EndMsg:
    """Parse one text frame; raises ProtocolError('bad_message') when unusable."""
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError(
            "bad_message", f"control message longer than {MAX_TEXT_BYTES} bytes"
        )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_message", f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "a control message must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "a control message needs a string 'type'")
    if kind not in KNOWN_TYPES:
        raise ProtocolError(
            "bad_message",
            f"unknown message type {kind[:40]!r}; expected one of {list(KNOWN_TYPES)}",
        )
    try:
        msg = _ADAPTER.validate_python(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or "message"
        raise ProtocolError(
            "bad_message", f"{kind}: field {where!r}: {err['msg']}"
        ) from None
    if isinstance(msg, EnrollMsg):
        check_speaker_name(msg.speaker)
    return msg


def check_speaker_name(name: str) -> None:
    """1-64 of letters, digits, space, '_', '-', '.'; not a reserved label."""
    if not 1 <= len(name) <= MAX_NAME_LEN:
        raise ProtocolError(
            "bad_message", f"speaker name must be 1-{MAX_NAME_LEN} characters"
        )
    for ch in name:
        if not (ch in " _-." or unicodedata.category(ch)[0] in "LN"):
            raise ProtocolError(
                "bad_message",
                f"speaker name may hold letters, digits, space, '_', '-', '.'; "
                f"not {ch!r}",
            )
    if not name.strip():
        raise ProtocolError("bad_message", "speaker name may not be blank")
    if name.strip().lower() in RESERVED_LABELS:
        raise ProtocolError("bad_message", f"{name!r} is a reserved label")


def error(code: str, message: str) -> dict:
    """The protocol's error message."""
    return {"type": "error", "code": code, "message": message}


# Close codes of the fatal errors.
CLOSE_CODES = {
    "frame_too_large": 1009,
    "rate_exceeded": 1008,
    "overloaded": 1013,
    "internal": 1011,
    "session_expired": 4404,
    "unauthorized": 4401,
}
