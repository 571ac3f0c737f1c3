"""The Server-Sent Events transport: ``GET /realtime/sse/?rooms=a,b`` (docs/transports.md).

One async Django view streams what a WebSocket would receive after joining the rooms: one SSE
event per frame (``event:`` the frame type, ``data:`` the frame JSON, ``id:`` the cursor of
every joined room after that frame). A reconnecting ``EventSource`` sends the last id back as
``Last-Event-ID``; the view joins each room through ``session.Session`` with ``after_seq`` from
it, so the guarantee (order, no gap, no duplicate, resume) is the WebSocket's. Clients send with
the HTTP API. Django's ASGI handler cancels the stream when the client disconnects; on SIGTERM
``drain`` ends it and the client reconnects to another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from realtime import cursor, drain
from realtime.conf import conf
from realtime.errors import RealtimeError, Unavailable
from realtime.protocol import ErrorCode, FrameError
from realtime.session import MAX_PENDING, Session
from realtime.views import ApiError, error_response

logger = logging.getLogger(__name__)

# Milliseconds an EventSource waits before reconnecting by itself (the SSE "retry" field).
RECONNECT_MS = 2000


async def request_user(request: HttpRequest) -> Any:
    """The request's user, read without blocking the event loop (None without auth)."""
    auser = getattr(request, "auser", None)
    return await auser() if auser is not None else None


def refusal(frame: dict[str, Any]) -> HttpResponse:
    """The JSON error response of a join's ``error`` frame."""
    return error_response(
        ApiError(ErrorCode(frame["code"]), str(frame.get("message", "")), status=None)
    )


class Stream:
    """One SSE client: the frames its session emitted, waiting to be written."""

    def __init__(self, rooms: list[str], start: dict[str, cursor.Position]) -> None:
        self.tracker = cursor.Tracker(rooms, start)  # follows what was written: event ids
        self.joins = cursor.Tracker(rooms, start)  # follows what was emitted: join outcomes
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self.ended = False
        self.close_code: int | None = None
        self.done = asyncio.Event()

    async def emit(self, text: str) -> None:
        if self.ended:
            return
        if self.queue.qsize() >= MAX_PENDING:
            # The client does not read (daphne buffers without limit): end the stream; it
            # resumes from its last event id rather than have the server grow without bound.
            self.end(4008)
            return
        frame: dict[str, Any] = json.loads(text)
        self.joins.see(frame)
        self.queue.put_nowait((text, frame))

    async def close(self, code: int) -> None:
        """The session aborted (slow consumer, a gap it could not fill): end the stream."""
        self.end(code)

    def end(self, code: int) -> None:
        if not self.ended:
            self.ended = True
            self.close_code = code
            self.queue.put_nowait(None)

    async def drain(self, code: int) -> None:
        """End the stream (graceful drain); returns once the response is finished."""
        self.end(code)
        await self.done.wait()

    def event(self, text: str, frame: dict[str, Any]) -> bytes:
        self.tracker.see(frame)
        # The frame JSON is compact and one line (JSON escapes newlines inside strings).
        return f"event: {frame['type']}\nid: {self.tracker.cursor}\ndata: {text}\n\n".encode()

    async def events(self, session: Session) -> AsyncIterator[bytes]:
        """The response body; closes the session however it ends (a disconnect cancels it)."""
        try:
            yield f"retry: {RECONNECT_MS}\n\n".encode()
            while True:
                try:
                    async with asyncio.timeout(conf.REALTIME_SSE_KEEPALIVE):
                        item = await self.queue.get()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if item is None:
                    yield f": closed {self.close_code}\n\n".encode()
                    return
                yield self.event(*item)
        finally:
            drain.unregister(self)
            self.ended = True
            try:
                await session.close()
            finally:
                self.done.set()


def _method_not_allowed(request: HttpRequest) -> HttpResponse:
    return error_response(
        ApiError(
            ErrorCode.BAD_FRAME,
            f"method {request.method} is not allowed here; use GET",
            status=405,
            headers={"Allow": "GET"},
        )
    )


@csrf_exempt
@transaction.non_atomic_requests
async def sse(request: HttpRequest) -> HttpResponseBase:
    """Stream the frames of ``rooms`` as Server-Sent Events, resuming from the cursor."""
    if request.method != "GET":
        return _method_not_allowed(request)
    try:
        rooms = cursor.parse_rooms(request.GET.get("rooms"))
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id:
            start = cursor.parse_cursor(last_event_id, "Last-Event-ID")
        else:
            start = cursor.parse_cursor(request.GET.get("after"), "after")
    except FrameError as exc:
        return error_response(exc)
    if drain.draining():
        return error_response(Unavailable("this server is restarting; reconnect"))
    stream = Stream(rooms, start)
    try:
        user = await request_user(request)
        session = Session(user, stream.emit, stream.close)
    except RealtimeError as exc:
        return error_response(exc)
    try:
        await session.start()
        await cursor.join_all(session, rooms, start)
    except BaseException:
        await session.close()
        raise
    # Each refused room gets its error event; only when none could be joined is the answer
    # an error status (an EventSource does not reconnect after one).
    refused = stream.joins.all_refused()
    if refused is not None:
        await session.close()
        return refusal(refused)
    with contextlib.suppress(Exception):
        drain.install()
    drain.register(stream)
    response = StreamingHttpResponse(stream.events(session), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: write each event at once
    return response
