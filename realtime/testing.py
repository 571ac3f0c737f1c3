"""Helpers for a host project's own tests: connect as a user, join, send, expect frames,
publish and assert delivery.

Everything is async: use it from ``async def`` tests (pytest-asyncio, or the async test methods
of Django's ``TransactionTestCase``). The consumer reads the database from worker threads, so
tests need a database those threads see: ``TransactionTestCase`` or
``pytest.mark.django_db(transaction=True)``. See docs/testing.md.

Every wait has a deadline and fails with the frames seen so far; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from realtime.consumers import RealtimeConsumer
from realtime.publishing import apublish

Frame = dict[str, Any]

DEFAULT_WITHIN = 10.0  # seconds; generous, so that a loaded CI machine does not flake
_REPLY_TYPES = frozenset({"ack", "pong", "error"})


class RealtimeClient:
    """One test WebSocket connection speaking protocol v1 (docs/protocol.md).

    ``frames`` holds every frame received, in order. ``expect()`` returns the first matching
    frame not yet returned by an earlier ``expect()``; frames it skips stay available.
    """

    def __init__(self, communicator: Any, label: str, within: float) -> None:
        self.communicator = communicator
        self.label = label
        self.within = within
        self.frames: list[Frame] = []
        self.hello: Frame = {}
        self.close_code: int | None = None
        self._unread: list[Frame] = []
        self._refs = itertools.count(1)

    # -- sending ---------------------------------------------------------------------------

    async def send_frame(self, frame: Frame) -> str | None:
        """Send one frame; a ``ref`` is added unless present (or the frame is ``typing``)."""
        if "ref" not in frame and frame.get("type") != "typing":
            frame = {**frame, "ref": f"{self.label}-{next(self._refs)}"}
        await self.communicator.send_to(text_data=json.dumps(frame))
        ref = frame.get("ref")
        return ref if isinstance(ref, str) else None

    async def request(self, frame: Frame, within: float | None = None) -> Frame:
        """Send ``frame`` and return its reply: the ``ack``, ``pong`` or ``error`` with its ref."""
        ref = await self.send_frame(frame)
        return await self.expect(
            lambda f: f.get("ref") == ref and f["type"] in _REPLY_TYPES,
            within=within,
            what=f"the reply to {frame.get('type')} {ref}",
        )

    async def join(
        self, room: str, *, after_seq: int | None = None, epoch: int | None = None
    ) -> Frame:
        """Join ``room``; asserts the ``ack`` and the ``presence_state`` after it, returns the ack.

        Replayed messages (with ``after_seq``) are left for ``expect_message()``.
        """
        frame: Frame = {"type": "join", "room": room}
        if after_seq is not None:
            frame["after_seq"] = after_seq
        if epoch is not None:
            frame["epoch"] = epoch
        ack = await self.request(frame)
        assert ack["type"] == "ack", f"{self.label}: join {room!r} refused: {ack}"
        await self.expect("presence_state", room=room)
        return ack

    async def leave(self, room: str) -> Frame:
        """Leave ``room``; returns the ack."""
        ack = await self.request({"type": "leave", "room": room})
        assert ack["type"] == "ack", f"{self.label}: leave {room!r} refused: {ack}"
        return ack

    async def send(
        self, room: str, payload: dict[str, Any], *, client_msg_id: str | None = None
    ) -> Frame:
        """Send a message to ``room``; asserts and returns the ack ({room, seq, id, ...})."""
        frame: Frame = {"type": "send", "room": room, "payload": payload}
        if client_msg_id is not None:
            frame["client_msg_id"] = client_msg_id
        ack = await self.request(frame)
        assert ack["type"] == "ack", f"{self.label}: send to {room!r} refused: {ack}"
        return ack

    async def ping(self) -> Frame:
        """A ping round trip; returns the pong."""
        pong = await self.request({"type": "ping"})
        assert pong["type"] == "pong", f"{self.label}: {pong}"
        return pong

    # -- receiving -------------------------------------------------------------------------

    async def expect(
        self,
        match: str | Callable[[Frame], bool] | None = None,
        *,
        within: float | None = None,
        what: str | None = None,
        **fields: Any,
    ) -> Frame:
        """The next frame of type ``match`` (or for which ``match(frame)`` is true) whose
        ``fields`` equal the given values, within ``within`` seconds (default: the client's).

        An ``error`` frame that does not match fails at once, as does the connection closing.
        """

        def matches(frame: Frame) -> bool:
            if callable(match):
                if not match(frame):
                    return False
            elif match is not None and frame.get("type") != match:
                return False
            return all(frame.get(key) == value for key, value in fields.items())

        description = what or _describe(match, fields)
        for index, frame in enumerate(self._unread):
            if matches(frame):
                return self._unread.pop(index)
        deadline = _now() + (self.within if within is None else within)
        while True:
            frame = await self._receive(deadline, description)
            if matches(frame):
                return frame
            self._unread.append(frame)
            if frame.get("type") == "error":
                raise AssertionError(f"{self.label}: got {frame} while waiting for {description}")

    async def expect_message(
        self, room: str, *, within: float | None = None, **fields: Any
    ) -> Frame:
        """The next ``message`` frame of ``room`` (whose ``fields``, e.g. payload, match)."""
        return await self.expect("message", room=room, within=within, **fields)

    async def drain(self) -> list[Frame]:
        """Every frame received and not yet expected, up to now (a ping round trip marks
        "now": the server emitted these before its pong). An empty list means nothing else
        arrived; frames still travelling from another connection may come later."""
        await self.ping()
        unread, self._unread = self._unread, []
        return unread

    async def expect_closed(self, code: int | None = None, within: float | None = None) -> int:
        """Wait until the server closes the connection (with ``code``); returns the code."""
        deadline = _now() + (self.within if within is None else within)
        while self.close_code is None:
            try:
                frame = await self._receive(deadline, f"the close {code or ''}".strip())
            except _Closed:
                break
            self._unread.append(frame)
        assert code is None or self.close_code == code, (
            f"{self.label}: closed with {self.close_code}, expected {code}"
        )
        assert self.close_code is not None
        return self.close_code

    async def close(self) -> None:
        """Disconnect (the client side of closing); raises what the application raised."""
        future = self.communicator.future
        if future.done():  # ended already: crashed, or cancelled by a failed wait
            if not future.cancelled():
                future.result()
            return
        await self.communicator.disconnect(timeout=self.within)

    async def _receive(self, deadline: float, what: str) -> Frame:
        if self.close_code is not None:
            raise _Closed(f"{self.label}: closed ({self.close_code}) while waiting for {what}")
        remaining = deadline - _now()
        try:
            if remaining <= 0:
                raise TimeoutError
            output = await self.communicator.receive_output(remaining)
        except TimeoutError:
            raise AssertionError(
                f"{self.label}: no {what} within the deadline; last frames: {self.frames[-10:]}"
            ) from None
        if output["type"] == "websocket.close":
            self.close_code = int(output.get("code", 1000))
            raise _Closed(f"{self.label}: closed ({self.close_code}) while waiting for {what}")
        assert output["type"] == "websocket.send", output
        text = output.get("text")
        assert isinstance(text, str), f"{self.label}: got a binary frame {output!r:.200}"
        frame: Frame = json.loads(text)
        self.frames.append(frame)
        return frame


class _Closed(AssertionError):
    """The server closed the connection."""


def _now() -> float:
    return asyncio.get_running_loop().time()


def _describe(match: str | Callable[[Frame], bool] | None, fields: dict[str, Any]) -> str:
    kind = getattr(match, "__name__", "matching") if callable(match) else (match or "any")
    details = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"{kind} frame" + (f" with {details}" if details else "")


def default_origin() -> str:
    """An ``Origin`` the AllowedHostsOriginValidator accepts: the first host in
    ALLOWED_HOSTS that is not a wildcard, else localhost (allowed while DEBUG is on)."""
    for host in settings.ALLOWED_HOSTS:
        if host != "*":
            return "http://" + host.lstrip(".")
    return "http://localhost"


def _session_cookie(user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}"


@asynccontextmanager
async def connect(
    user: Any = None,
    *,
    application: Any = None,
    path: str = "/ws/",
    origin: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    within: float = DEFAULT_WITHIN,
    label: str | None = None,
) -> AsyncIterator[RealtimeClient]:
    """A connected RealtimeClient for ``user`` (None: anonymous); disconnects on exit.

    Without ``application`` it talks to realtime's consumer directly with ``scope["user"]``
    set: fast, and independent of the project's ASGI wiring. With ``application`` (your
    project's ASGI application, e.g. ``from mysite.asgi import application``) it goes through
    your whole stack: the user is logged in with a session cookie (``Client.force_login``)
    and the ``Origin`` header is ``origin`` (default: ``default_origin()``).
    Asserts that the connection is accepted and that ``hello`` comes first.
    """
    if application is None:
        communicator = WebsocketCommunicator(RealtimeConsumer.as_asgi(), path)
        communicator.scope["user"] = AnonymousUser() if user is None else user
    else:
        sent = [(b"origin", (origin or default_origin()).encode("latin-1")), *headers]
        if user is not None and user.is_authenticated:
            cookie = await database_sync_to_async(_session_cookie)(user)
            sent.append((b"cookie", cookie.encode("latin-1")))
        communicator = WebsocketCommunicator(application, path, headers=sent)
    name = label or (user.get_username() if user is not None and user.is_authenticated else "anon")
    client = RealtimeClient(communicator, name, within)
    accepted, detail = await communicator.connect(timeout=within)
    if not accepted:
        raise AssertionError(f"{name}: the WebSocket connection was refused (close {detail})")
    try:
        client.hello = await client.expect("hello")
        assert client.frames[0] is client.hello, client.frames
        yield client
    except BaseException:
        with contextlib.suppress(Exception):  # the test's own failure is the one to report
            await client.close()
        raise
    await client.close()


async def publish(room: str, payload: dict[str, Any]) -> Frame:
    """Publish a server message (no sender) into ``room``, as application code would with
    ``realtime.publishing``; returns the message ({room, seq, id, payload, ...})."""
    return await apublish(room, payload)


async def assert_delivered(
    message: Frame, *clients: RealtimeClient, within: float | None = None
) -> list[Frame]:
    """Assert that every client receives ``message`` (a published message, or the ack of a
    send: anything with room and seq); returns the ``message`` frame each one got."""
    received = []
    for client in clients:
        frame = await client.expect_message(message["room"], seq=message["seq"], within=within)
        for key in ("id", "payload", "sender"):
            if key in message:
                assert frame[key] == message[key], f"{client.label}: {frame} != {message}"
        received.append(frame)
    return received
