"""The long-polling transport: ``GET|POST /realtime/poll/`` (docs/transports.md).

``GET ?rooms=a,b&cursor=a:12:1,b:4:1`` joins each room through ``session.Session`` with
``after_seq`` from the cursor, exactly as a reconnecting WebSocket would, and answers
``{"cursor", "frames"}`` with the frames that session emitted: at once when there is anything
after the cursor, otherwise after waiting up to ``REALTIME_LONGPOLL_TIMEOUT`` seconds for the
rooms' next frames. The client polls again with the returned cursor, so order, gap-freedom and
resume are the WebSocket's. A poller re-joins on every request, so it is not counted in
presence (it reads ``presence_state`` and diffs, but never appears in them).

``POST`` sends a message: the body of ``POST /realtime/api/rooms/<room>/messages`` plus
``room``, with the same session, CSRF, rights and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

from asgiref.sync import sync_to_async
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from realtime import cursor, drain, views
from realtime.conf import conf
from realtime.errors import RealtimeError, Unavailable
from realtime.protocol import ErrorCode, FrameError, ServerType
from realtime.session import MAX_PENDING, Session
from realtime.sse import authenticate, finished, refusal

# Frames that, alone, are no reason to answer before the timeout: every poll's session says
# hello, and a join that resumes cleanly says ack (recovered) and presence_state.
_QUIET = {ServerType.HELLO, ServerType.PRESENCE_STATE, ServerType.PONG}


class Poll:
    """One long-poll request: collects what its session emits and wakes on news."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.news = asyncio.Event()
        self.done = asyncio.Event()
        self.request_task = asyncio.current_task()  # writes the answer; a drain waits for it

    async def emit(self, text: str) -> None:
        if len(self.frames) >= MAX_PENDING:
            self.news.set()  # answer now; the next poll continues from the cursor
            return
        frame: dict[str, Any] = json.loads(text)
        self.frames.append(frame)
        quiet = frame["type"] in _QUIET or (
            frame["type"] == ServerType.ACK and frame.get("recovered") is True
        )
        if not quiet:
            self.news.set()

    async def close(self, code: int) -> None:
        """The session aborted: answer with what was collected (the cursor covers it)."""
        self.news.set()

    async def drain(self, code: int) -> None:
        """Answer at once (graceful drain); the client polls another process next."""
        self.news.set()
        await self.done.wait()
        await finished(self.request_task)


def _timeout(request: HttpRequest) -> float:
    limit = float(conf.REALTIME_LONGPOLL_TIMEOUT)
    raw = request.GET.get("timeout")
    if raw is None:
        return limit
    if re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,3})?", raw) is None or float(raw) > limit:
        raise FrameError(
            ErrorCode.BAD_FRAME, f"timeout must be a number of seconds from 0 to {limit:g}"
        )
    return float(raw)


async def _wait(request: HttpRequest) -> HttpResponse:
    try:
        rooms = cursor.parse_rooms(request.GET.get("rooms"))
        if not rooms:
            raise FrameError(ErrorCode.INVALID_ROOM, "rooms is required (comma-separated slugs)")
        start = cursor.parse_cursor(request.GET.get("cursor"))
        timeout = _timeout(request)
    except FrameError as exc:
        return views.error_response(exc)
    if drain.draining():
        return views.error_response(Unavailable("this server is restarting; poll again"))
    poll = Poll()
    try:
        user, _ = await authenticate(request)  # a poll is too short-lived to re-check
        session = Session(user, poll.emit, poll.close, announce_presence=False)
    except RealtimeError as exc:
        return views.error_response(exc)
    with contextlib.suppress(Exception):
        drain.install()
    drain.register(poll)
    try:
        await session.start()
        await cursor.join_all(session, rooms, start)
        if not poll.news.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await poll.news.wait()
    finally:
        drain.unregister(poll)
        try:
            await session.close()
        finally:
            poll.done.set()
    tracker = cursor.Tracker(rooms, start)
    for frame in poll.frames:
        tracker.see(frame)
    refused = tracker.all_refused()
    if refused is not None:
        return refusal(refused)
    return JsonResponse({"cursor": tracker.cursor, "frames": poll.frames})


def _room_of(request: HttpRequest) -> str:
    try:
        body = json.loads(request.body)
    except ValueError:
        raise FrameError(ErrorCode.BAD_FRAME, "the request body is not valid JSON") from None
    room = body.get("room") if isinstance(body, dict) else None
    if not isinstance(room, str):
        raise FrameError(ErrorCode.INVALID_ROOM, "room is required and must be a string")
    return room


async def _send(request: HttpRequest) -> HttpResponse:
    try:
        room = _room_of(request)
    except FrameError as exc:
        return views.error_response(exc)
    # The messages API does the rest: CSRF, rights, validation, storage, broadcast, errors.
    response: HttpResponse = await sync_to_async(views.messages)(request, room)
    return response


@csrf_exempt  # POST runs Django's CSRF check itself (views.api), answering in JSON
@transaction.non_atomic_requests
async def poll(request: HttpRequest) -> HttpResponse:
    """GET: frames after the cursor, or wait for them. POST: send a message."""
    if request.method == "GET":
        return await _wait(request)
    if request.method == "POST":
        return await _send(request)
    return views.error_response(
        views.ApiError(
            ErrorCode.BAD_FRAME,
            f"method {request.method} is not allowed here; use GET or POST",
            status=405,
            headers={"Allow": "GET, POST"},
        )
    )
