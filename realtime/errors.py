"""Domain errors; each carries the wire error code it becomes (see protocol.ErrorCode)."""

from __future__ import annotations

from realtime.protocol import CloseCode, ErrorCode


class RealtimeError(Exception):
    """Base class: translated to an ``error`` frame (or a 4xx JSON body) in one place."""

    code: ErrorCode = ErrorCode.INTERNAL
    close_code: CloseCode | None = None
    default_message = "internal error"

    def __init__(self, message: str | None = None, retry_after: float | None = None) -> None:
        self.message = message or self.default_message
        self.retry_after = retry_after
        super().__init__(self.message)


class RoomNotFound(RealtimeError):
    code = ErrorCode.ROOM_NOT_FOUND
    default_message = "no such room"


class Forbidden(RealtimeError):
    code = ErrorCode.FORBIDDEN
    close_code = CloseCode.FORBIDDEN
    default_message = "you may not do that in this room"


class Unauthorized(RealtimeError):
    code = ErrorCode.UNAUTHORIZED
    close_code = CloseCode.UNAUTHORIZED
    default_message = "log in first"


class NotJoined(RealtimeError):
    code = ErrorCode.NOT_JOINED
    default_message = "join the room first"


class AlreadyJoined(RealtimeError):
    code = ErrorCode.BAD_FRAME
    default_message = "already joined this room"


class RateLimited(RealtimeError):
    code = ErrorCode.RATE_LIMITED
    close_code = CloseCode.RATE_LIMITED
    default_message = "slow down"


class Unavailable(RealtimeError):
    code = ErrorCode.UNAVAILABLE
    default_message = "a backing service is unavailable; retry shortly"
