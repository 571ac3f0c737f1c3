"""Graceful drain: on shutdown, close every client with 1012 so it resumes on another process.

Transports register what they serve (``register``); ``drain_all`` tells each one to go and
waits, up to ``DRAIN_TIMEOUT`` seconds, until its client has closed. Under daphne, ``install``
(called by the consumer on its first connection) hooks this into Twisted's shutdown, which
daphne starts on SIGTERM or SIGINT: a "before shutdown" trigger returning a Deferred holds the
reactor until the drain is done, while the process keeps serving the close handshakes.

At the same moment daphne cancels every application instance (its own "before shutdown"
trigger); ``draining()`` is already true when those cancellations arrive, so a transport can
tell a drain from any other cancellation and finish its close handshake first.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from typing import Any, Protocol

from realtime.protocol import CloseCode

logger = logging.getLogger(__name__)

# Longest a process waits on shutdown for its clients' close handshakes. Keep the process
# manager's stop timeout above it (the systemd unit in deploy/ allows 30 s).
DRAIN_TIMEOUT = 10.0


class Drainable(Protocol):
    """What a transport registers: one client connection that can be told to go."""

    async def drain(self, code: int) -> None:
        """Close the client with ``code``; return once it is gone."""


_live: weakref.WeakSet[Drainable] = weakref.WeakSet()
_draining = False
_installed: set[int] = set()
# Drains of connections registered after ``drain_all`` took its list (kept until done).
_late: set[asyncio.Future[None]] = set()


def register(connection: Drainable) -> None:
    """Track a live connection until ``unregister`` (or until it is garbage).

    A connection registered once the drain has begun (an SSE stream or a poll that passed its
    ``draining()`` check, then awaited its login and joins meanwhile) is told to go at once:
    ``drain_all`` has already taken its list and would not wait for it, while the server would
    hold the request open until its own timeout.
    """
    _live.add(connection)
    if _draining:
        late = asyncio.ensure_future(connection.drain(CloseCode.RESTARTING))
        _late.add(late)
        late.add_done_callback(_late.discard)


def unregister(connection: Drainable) -> None:
    """Stop tracking a connection (it closed)."""
    _live.discard(connection)


def draining() -> bool:
    """True once this process has started shutting down; new connections should go away."""
    return _draining


def live_count() -> int:
    """How many connections are registered."""
    return len(_live)


def begin() -> None:
    """Mark the process as draining (synchronously, before any task runs)."""
    global _draining
    _draining = True


async def drain_all(code: int = CloseCode.RESTARTING, grace: float = DRAIN_TIMEOUT) -> int:
    """Tell every live connection to go with ``code``; wait up to ``grace`` s for them.

    Returns how many connections were still open at the deadline. Usable from any server's
    shutdown hook (an ASGI lifespan handler, for instance), not only daphne's.
    """
    begin()
    connections = list(_live)
    if not connections:
        return 0
    logger.info("realtime: draining %d connection(s) with close code %d", len(connections), code)
    tasks = [asyncio.ensure_future(connection.drain(code)) for connection in connections]
    done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("realtime: a connection failed to drain", exc_info=task.exception())
    if pending:
        logger.warning("realtime: %d connection(s) still open after %.0f s", len(pending), grace)
    return len(pending)


def _stop_listening(reactor: Any) -> None:
    # New connections must reach another process: a refused connect makes nginx try the next
    # upstream at once, whereas an accepted one would only be closed again.
    from twisted.internet.interfaces import IListeningPort

    for reader in list(reactor.getReaders()):
        if IListeningPort.providedBy(reader):
            reader.stopListening()


def _before_shutdown(reactor: Any) -> Any:
    from twisted.internet.defer import Deferred

    begin()
    try:
        _stop_listening(reactor)
    except Exception:
        logger.warning("realtime: could not stop listening before the drain", exc_info=True)
    return Deferred.fromFuture(asyncio.ensure_future(drain_all()))


# Close codes that RFC 6455 (section 7.4.1) and the IANA registry define for servers to send.
SERVER_CLOSE_CODES = frozenset({1001, 1011, 1012, 1013})


def _let_server_close_codes_through() -> None:
    # daphne closes a socket for an ASGI websocket.close with autobahn's sendClose, which
    # refuses every code but 1000 and 3000-4999 ("invalid close code"): 1011 (internal) and
    # 1012 (restarting) would raise instead of closing. daphne itself sends 1011 through
    # sendCloseFrame, which takes any code; do the same for the server codes, nothing else.
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.serverClose
    if getattr(original, "realtime_close_codes", False):
        return

    def server_close(self: Any, code: int | None = None) -> None:
        if code in SERVER_CLOSE_CODES:
            self.sendCloseFrame(code=int(code), isReply=False)
        else:
            original(self, code)

    server_close.realtime_close_codes = True  # type: ignore[attr-defined]
    WebSocketProtocol.serverClose = server_close


def install() -> bool:
    """Hook into daphne, once per reactor: drain on shutdown, send 1011/1012 closes.

    False when not running under daphne. Only a Twisted reactor that already runs this event
    loop (daphne installs the asyncio reactor) is used: importing ``twisted.internet.reactor``
    here would install one.
    """
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or not getattr(reactor, "running", False):
        return False
    if getattr(reactor, "_asyncioEventloop", None) is not asyncio.get_running_loop():
        return False
    if id(reactor) in _installed:
        return True
    _installed.add(id(reactor))
    _let_server_close_codes_through()
    reactor.addSystemEventTrigger("before", "shutdown", _before_shutdown, reactor)
    return True
