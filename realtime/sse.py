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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from realtime import auth, cursor, drain
from realtime.conf import conf
from realtime.errors import RealtimeError, Unavailable
from realtime.protocol import ErrorCode, FrameError
from realtime.session import MAX_PENDING, Session
from realtime.views import ApiError, error_response

logger = logging.getLogger(__name__)

# Milliseconds an EventSource waits before reconnecting by itself (the SSE "retry" field).
RECONNECT_MS = 2000


async def authenticate(request: HttpRequest) -> tuple[Any, auth.Credentials | None]:
    """The user of the request's ``?ticket=`` (redeemed) or session, and what it rests on."""
    try:
        return await sync_to_async(auth.authenticate_request)(request)
    except auth.TicketError as exc:
        raise ApiError(ErrorCode.UNAUTHORIZED, f"the ticket was refused: {exc.reason}") from None


def refusal(frame: dict[str, Any]) -> HttpResponse:
    """The JSON error response of a join's ``error`` frame."""
    return error_response(
        ApiError(ErrorCode(frame["code"]), str(frame.get("message", "")), status=None)
    )


async def finished(task: asyncio.Task[Any] | None) -> None:
    """Wait (bounded) until the task that writes a response is done.

    A drain must not let the server shut down while a response is still being handed to it:
    daphne drops whatever an application has not sent when its reactor stops.
    """
    if task is not None and not task.done() and task is not asyncio.current_task():
        await asyncio.wait({task}, timeout=drain.DRAIN_TIMEOUT)


class Stream:
    """One SSE client: the frames its session emitted, waiting to be written."""

    def __init__(self, rooms: list[str], start: dict[str, cursor.Position]) -> None:
        self.tracker = cursor.Tracker(rooms, start)  # follows what was written: event ids
        self.joins = cursor.Tracker(rooms, start)  # follows what was emitted: join outcomes
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self.ended = False
        self.close_code: int | None = None
        self.done = asyncio.Event()
        # The task that writes the response (Django's): a drain waits until it has finished.
        self.request_task = asyncio.current_task()

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
        await finished(self.request_task)

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


ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def drain_shield(app: ASGIApp) -> ASGIApp:
    """Wrap an HTTP ASGI app so requests in flight finish when the server drains.

    daphne cancels every application when it shuts down. Django's handler, cancelled while
    it streams, leaves its disconnect listener behind (a "Task exception was never retrieved"
    traceback once the client goes). During a drain the streams end by themselves
    (``drain_all``) and other requests complete, so let them, for up to DRAIN_TIMEOUT seconds.
    """

    async def shielded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        task = asyncio.ensure_future(app(scope, receive, send))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if drain.draining() and not task.done():
                await asyncio.wait({task}, timeout=drain.DRAIN_TIMEOUT)
            task.cancel()
            raise

    return shielded


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
        user, credentials = await authenticate(request)
        # With credentials the session re-checks the login (REALTIME_AUTH_RECHECK): a logout
        # or a ban ends the stream as it closes a WebSocket.
        session = Session(user, stream.emit, stream.close, credentials=credentials)
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
