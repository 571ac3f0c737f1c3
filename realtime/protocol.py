"""Wire protocol v1: frame types, parsing, encoding and close codes.

No Django and no I/O here: this module is the contract that every transport and every
client (including ``static/realtime/realtime.js``) is checked against.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

PROTOCOL_VERSION = 1

ROOM_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_REF_LENGTH = 64
MAX_CLIENT_MSG_ID_LENGTH = 64
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 100
# Envelope bytes allowed on top of the payload limit before a frame is refused unparsed.
ENVELOPE_ALLOWANCE = 1024
MAX_PAYLOAD_DEPTH = 32
# Object keys in one payload, all levels together: bounds the work of walking and storing it.
MAX_PAYLOAD_KEYS = 1000


class ClientType(StrEnum):
    JOIN = "join"
    LEAVE = "leave"
    SEND = "send"
    TYPING = "typing"
    HISTORY = "history"
    PING = "ping"


class ServerType(StrEnum):
    HELLO = "hello"
    ACK = "ack"
    PONG = "pong"
    MESSAGE = "message"
    PRESENCE_STATE = "presence_state"
    PRESENCE_DIFF = "presence_diff"
    TYPING = "typing"
    RETRACT = "retract"
    REMOVED = "removed"
    ERROR = "error"


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_ROOM = "invalid_room"
    ROOM_NOT_FOUND = "room_not_found"
    FORBIDDEN = "forbidden"
    UNAUTHORIZED = "unauthorized"
    NOT_JOINED = "not_joined"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    NORMAL = 1000
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTARTING = 1012
    UNAUTHORIZED = 4001
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029


class RemovedReason(StrEnum):
    KICKED = "kicked"
    BANNED = "banned"
    ARCHIVED = "archived"
    FORBIDDEN = "forbidden"


# Which envelope fields each client frame type requires.
ROOM_REQUIRED = frozenset(
    {ClientType.JOIN, ClientType.LEAVE, ClientType.SEND, ClientType.TYPING, ClientType.HISTORY}
)


class FrameError(Exception):
    """A frame that cannot be accepted; becomes an ``error`` frame with ``code``."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Frame:
    """A validated client frame."""

    type: ClientType
    ref: str | None = None
    room: str | None = None
    payload: dict[str, Any] | None = None
    after_seq: int | None = None
    epoch: int | None = None
    before_seq: int | None = None
    limit: int = HISTORY_DEFAULT_LIMIT
    client_msg_id: str | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def is_valid_room(room: object) -> bool:
    """True when ``room`` is a string that is a valid room slug."""
    return isinstance(room, str) and ROOM_RE.fullmatch(room) is not None


def _int_field(obj: dict[str, Any], name: str, ref: str | None, minimum: int) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    # bool is an int subclass; True must not read as seq 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FrameError(ErrorCode.BAD_FRAME, f"{name} must be an integer >= {minimum}", ref)
    if value > 2**63 - 1:
        raise FrameError(ErrorCode.BAD_FRAME, f"{name} is out of range", ref)
    return value


def check_payload(payload: Any, max_bytes: int, ref: str | None = None) -> str:
    """Validate a message payload and return its canonical JSON encoding."""
    if not isinstance(payload, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "payload must be a JSON object", ref)
    _check_value(payload, 0, ref)
    if _count_keys(payload) > MAX_PAYLOAD_KEYS:
        raise FrameError(ErrorCode.BAD_FRAME, f"payload has more than {MAX_PAYLOAD_KEYS} keys", ref)
    try:
        encoded = encode(payload)
    except ValueError:
        # 1e999 parses as inf, which has no JSON form.
        raise FrameError(ErrorCode.BAD_FRAME, "payload numbers must be finite", ref) from None
    if len(encoded.encode("utf-8")) > max_bytes:
        raise FrameError(ErrorCode.TOO_LARGE, f"payload exceeds {max_bytes} bytes", ref)
    return encoded


def _check_value(value: Any, depth: int, ref: str | None) -> None:
    # Walk once so that storage (PostgreSQL jsonb rejects NUL and lone surrogates) and
    # every client can take whatever we accept.
    if depth > MAX_PAYLOAD_DEPTH:
        raise FrameError(ErrorCode.BAD_FRAME, f"payload nests deeper than {MAX_PAYLOAD_DEPTH}", ref)
    if isinstance(value, str):
        _check_text(value, ref)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, ref)
            _check_value(item, depth + 1, ref)
    elif isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1, ref)


def _count_keys(value: Any) -> int:
    # Iterative: the depth is already bounded, but no recursion is needed to count.
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _is_clean_text(text: str) -> bool:
    """True when ``text`` has no NUL and encodes as UTF-8 (no lone surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str, ref: str | None) -> None:
    if not _is_clean_text(text):
        raise FrameError(
            ErrorCode.BAD_FRAME, "payload strings must be UTF-8 text without NUL characters", ref
        )


def parse(text: str, max_payload_bytes: int) -> Frame:
    """Parse and validate one client text frame, raising FrameError on any fault."""
    if len(text) > max_payload_bytes + ENVELOPE_ALLOWANCE:
        raise FrameError(
            ErrorCode.TOO_LARGE, f"frame exceeds the {max_payload_bytes}-byte payload limit"
        )
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise FrameError(ErrorCode.BAD_FRAME, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "frame must be a JSON object")

    ref = obj.get("ref")
    if ref is not None and not (
        isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH and _is_clean_text(ref)
    ):
        # Not echoed: a ref that cannot be encoded back would break the error frame itself.
        raise FrameError(
            ErrorCode.BAD_FRAME, f"ref must be a string of at most {MAX_REF_LENGTH} characters"
        )
    kind = obj.get("type")
    if kind is None:
        raise FrameError(ErrorCode.BAD_FRAME, "type is required", ref)
    if not isinstance(kind, str):
        raise FrameError(ErrorCode.BAD_FRAME, "type must be a string", ref)
    try:
        frame_type = ClientType(kind)
    except ValueError:
        raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:32]!r}", ref) from None

    room = obj.get("room")
    if frame_type in ROOM_REQUIRED:
        if room is None:
            raise FrameError(ErrorCode.INVALID_ROOM, "room is required", ref)
        if not is_valid_room(room):
            raise FrameError(
                ErrorCode.INVALID_ROOM, "room must match ^[a-z0-9][a-z0-9_-]{0,63}$", ref
            )

    payload = None
    client_msg_id = None
    if frame_type is ClientType.SEND:
        if "payload" not in obj:
            raise FrameError(ErrorCode.BAD_FRAME, "payload is required", ref)
        check_payload(obj["payload"], max_payload_bytes, ref)
        payload = obj["payload"]
        client_msg_id = obj.get("client_msg_id")
        if client_msg_id is not None and not (
            isinstance(client_msg_id, str)
            and 0 < len(client_msg_id) <= MAX_CLIENT_MSG_ID_LENGTH
            and _is_clean_text(client_msg_id)
        ):
            raise FrameError(
                ErrorCode.BAD_FRAME,
                f"client_msg_id must be a non-empty string of at most {MAX_CLIENT_MSG_ID_LENGTH}",
                ref,
            )

    limit = _int_field(obj, "limit", ref, 1)
    if limit is not None and limit > HISTORY_MAX_LIMIT:
        raise FrameError(
            ErrorCode.BAD_FRAME, f"limit must be between 1 and {HISTORY_MAX_LIMIT}", ref
        )
    return Frame(
        type=frame_type,
        ref=ref,
        room=room,
        payload=payload,
        after_seq=_int_field(obj, "after_seq", ref, 0),
        epoch=_int_field(obj, "epoch", ref, 0),
        before_seq=_int_field(obj, "before_seq", ref, 1),
        limit=HISTORY_DEFAULT_LIMIT if limit is None else limit,
        client_msg_id=client_msg_id,
    )


def encode(obj: dict[str, Any]) -> str:
    """Encode a frame (or payload) as compact JSON text."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def with_ref(frame: dict[str, Any], ref: str | None) -> dict[str, Any]:
    """Add ``ref`` to a reply frame when the request carried one."""
    if ref is not None:
        frame["ref"] = ref
    return frame


def error_frame(
    code: ErrorCode | str,
    message: str,
    ref: str | None = None,
    retry_after: float | None = None,
) -> str:
    """Encode an ``error`` frame."""
    frame: dict[str, Any] = {"type": ServerType.ERROR, "code": str(code), "message": message}
    with_ref(frame, ref)
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return encode(frame)
