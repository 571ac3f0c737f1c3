"""Publish messages into rooms from server code: ``publish()`` (sync) and ``apublish()``.

A published message is stored like a client's send (next seq, in history, ``sender`` null) and
broadcast to every process. Inside a transaction the message row is written in that transaction
and broadcast when it commits (``transaction.on_commit``): a rollback stores nothing and sends
nothing, and a commit stores the message together with the caller's own changes.

Sync code has no event loop to broadcast with. Inside a request served by an ASGI server
(a sync view under daphne) the broadcast runs on the server's loop, through asgiref. Anywhere
else (WSGI workers, management commands, worker threads) it runs on one long-lived private loop
per process, in a daemon thread: channels-redis keeps a connection pool per event loop, so one
loop means one pool reused by every call, instead of a loop, a thread and fresh connections per
call (``async_to_sync`` without a server loop). See docs/publishing.md.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import SyncToAsync, async_to_sync
from channels.db import database_sync_to_async
from django.db import router, transaction

from realtime import broker, services
from realtime.conf import conf
from realtime.errors import Forbidden, RealtimeError, Unavailable
from realtime.models import Message
from realtime.protocol import ErrorCode, FrameError, check_payload, encode, is_valid_room

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

# Longest a broadcast may take before publish() gives up with Unavailable.
BROADCAST_TIMEOUT = 10.0
# Longest the private loop gets to close its Redis connections at interpreter exit.
SHUTDOWN_TIMEOUT = 5.0


class InvalidMessage(RealtimeError, ValueError):
    """A room slug or payload that publish() refuses: ``code`` is invalid_room, bad_frame or
    too_large, as for a client's ``send``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def validate(room: str, payload: Any) -> dict[str, Any]:
    """Check ``room`` and ``payload`` as for a client's send; returns the payload as JSON
    gives it back (tuples become lists, number keys strings). Raises InvalidMessage."""
    if not is_valid_room(room):
        raise InvalidMessage(
            ErrorCode.INVALID_ROOM, f"room must match ^[a-z0-9][a-z0-9_-]{{0,63}}$, not {room!r}"
        )
    if not isinstance(payload, dict):
        raise InvalidMessage(ErrorCode.BAD_FRAME, "payload must be a JSON object (a dict)")
    try:
        # Python values JSON cannot carry (NaN, sets, datetimes, tuple keys) are refused here.
        normalized: dict[str, Any] = json.loads(encode(payload))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidMessage(ErrorCode.BAD_FRAME, f"payload is not valid JSON: {exc}") from None
    try:
        check_payload(normalized, conf.REALTIME_MAX_PAYLOAD_BYTES)
    except FrameError as exc:
        raise InvalidMessage(exc.code, exc.message) from None
    return normalized


def _store(room: str, payload: dict[str, Any]) -> dict[str, Any]:
    # Server messages skip authorisation (no user), but an archived room takes no messages.
    if services.get_room(room).archived:
        raise Forbidden("room is archived")
    return services.append_message(room, None, payload).message


async def _broadcast(message: dict[str, Any]) -> None:
    frame = services.message_frame(message)
    try:
        await asyncio.wait_for(
            broker.publish_message(message["room"], message["seq"], frame), BROADCAST_TIMEOUT
        )
    except Exception as exc:
        logger.warning(
            "realtime: broadcast of %s#%s failed", message["room"], message["seq"], exc_info=True
        )
        raise Unavailable(
            "the message is stored but could not be broadcast; connected clients get it "
            "with the room's next message or on reconnect"
        ) from exc


class _PublisherLoop:
    """One event loop per process, in a daemon thread, for sync callers without a loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _current(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            # After a fork (e.g. a prefork worker pool) the thread is gone: start anew, and
            # leave the parent's loop and connections alone.
            if self._loop is None or self._pid != os.getpid() or not alive:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(loop, ready), name="realtime-publisher", daemon=True
                )
                thread.start()
                if not ready.wait(BROADCAST_TIMEOUT):
                    raise Unavailable("the realtime publisher thread did not start")
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                # channels-redis wraps loop.close() to close this loop's connection pool.
                loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for its result (at most ``timeout`` seconds)."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._current())
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        """Stop the loop and close its connections (at exit; a later call starts a new one)."""
        with self._lock:
            loop, thread, pid = self._loop, self._thread, self._pid
            self._loop = self._thread = None
        if loop is None or thread is None or pid != os.getpid() or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SHUTDOWN_TIMEOUT)


_publisher = _PublisherLoop()
atexit.register(_publisher.close)


def _server_loop() -> asyncio.AbstractEventLoop | None:
    """The running ASGI server loop this sync thread was called from, if any."""
    # asgiref records it for threads it runs sync code in (sync views under daphne).
    loop: asyncio.AbstractEventLoop | None = getattr(
        SyncToAsync.threadlocal, "main_event_loop", None
    )
    pid = getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None)
    if loop is not None and pid == os.getpid() and loop.is_running():
        return loop
    return None


def run_sync(fn: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``await fn(*args, **kwargs)`` from sync code, on the loop publish() uses.

    That is the ASGI server's loop when called from a request it serves, else this process's
    publisher loop (waiting at most BROADCAST_TIMEOUT + 1 s there; Unavailable after that).
    """
    _require_sync(getattr(fn, "__name__", "run_sync"))
    if _server_loop() is not None:
        # Runs on the server's loop, whose connection pool lives as long as the server.
        return async_to_sync(fn)(*args, **kwargs)
    try:
        return _publisher.run(fn(*args, **kwargs), BROADCAST_TIMEOUT + 1)
    except TimeoutError as exc:
        raise Unavailable("the realtime publisher loop did not answer in time") from exc


def broadcast(message: dict[str, Any]) -> None:
    """Broadcast a stored message (a services.message_dict) from sync code; Unavailable on
    failure."""
    _require_sync("broadcast")
    run_sync(_broadcast, message)


def _require_sync(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{name}() is for sync code, but an event loop is running in this thread; "
        "in async code use `await apublish(...)`"
    )


def _broadcast_on_commit(message: dict[str, Any]) -> None:
    # A failure is already logged. The message is committed: sessions fill the gap from the
    # database when the room's next broadcast reaches them; reconnecting clients replay it.
    with contextlib.suppress(Unavailable):
        broadcast(message)


def publish(room: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Store ``payload`` as a server message in ``room`` and broadcast it; returns the message.

    Outside a transaction the message is stored and broadcast before this returns. Inside one
    (``transaction.atomic``, ``ATOMIC_REQUESTS``) it is stored in that transaction and
    broadcast when it commits; after a rollback nothing was stored or sent, and the returned
    message never existed.

    Raises InvalidMessage (a ValueError) for a bad slug or payload, RoomNotFound, Forbidden
    (archived room), and, outside a transaction, Unavailable when the message was stored but
    could not be broadcast.
    """
    _require_sync("publish")
    message = _store(room, validate(room, payload))
    using = router.db_for_write(Message)
    if transaction.get_connection(using).in_atomic_block:
        transaction.on_commit(lambda: _broadcast_on_commit(message), using=using)
    else:
        broadcast(message)
    return message


async def apublish(room: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Async publish(): stores and broadcasts at once (async code has no transaction)."""
    checked = validate(room, payload)
    message: dict[str, Any] = await database_sync_to_async(_store)(room, checked)
    await _broadcast(message)
    return message
