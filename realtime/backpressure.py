"""What a connection has queued but its client has not taken yet (slow-consumer detection).

daphne writes every frame straight into the Twisted transport of the socket, which buffers
without limit while the client does not read. ``probe(send)`` finds that transport behind the
ASGI ``send`` callable (daphne passes ``partial(server.handle_reply, protocol)``; channels'
session middleware wraps it and keeps the original as ``real_send``) and returns a function
that reports the bytes still buffered.

uvicorn passes a bound method of its protocol, whose asyncio transport stops taking frames at
its high-water mark: past it, the ASGI ``send`` waits until the client reads. ``asyncio_flow``
finds that transport, so the consumer can keep a client that stopped reading from holding up
everyone else (consumers.py). Under any other server both return None.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

Probe = Callable[[], int]

# Seconds a slow client gets to read what is queued and the 4008 close behind it before the
# server drops the TCP connection (autobahn's close handshake timeout, 1 s by default).
SLOW_CLOSE_GRACE = 10.0
# Longest a connection's own work (a reply, a replay) waits for its client to read what is
# queued, checking every DRAIN_POLL seconds, before the client counts as slow.
DRAIN_WAIT = 10.0
DRAIN_POLL = 0.01


def find_protocol(send: Any) -> Any:
    """The server protocol behind an ASGI ``send``: daphne's WebSocket protocol, or an
    asyncio protocol (uvicorn's) with its transport; None for anything else."""
    for _ in range(16):  # wrappers nest a few levels at most
        if isinstance(send, functools.partial):
            for arg in send.args:
                if hasattr(arg, "transport") and hasattr(arg, "sendMessage"):
                    return arg
            send = send.func
            continue
        owner = getattr(send, "__self__", None)
        inner = getattr(owner, "real_send", None)
        if inner is None:
            return owner if _asyncio_transport(owner) is not None else None
        send = inner
    return None


def _asyncio_transport(protocol: Any) -> asyncio.WriteTransport | None:
    transport = getattr(protocol, "transport", None)
    if callable(getattr(transport, "get_write_buffer_size", None)) and callable(
        getattr(transport, "get_write_buffer_limits", None)
    ):
        return transport
    return None


class AsyncioFlow:
    """The write buffer of an asyncio server's transport (uvicorn).

    Past the transport's high-water mark the server's ``send`` waits for the client to read,
    until the buffer is back down to the low-water mark. ``fits`` tells whether a frame goes
    out at once.
    """

    __slots__ = ("protocol", "transport")

    def __init__(self, protocol: Any, transport: asyncio.WriteTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def fits(self, size: int) -> bool:
        """True if ``size`` more bytes go out without a wait: writing is not paused, and the
        buffer stays within the high-water mark."""
        transport = self.transport
        queued = transport.get_write_buffer_size()
        low, high = transport.get_write_buffer_limits()
        if queued + size > high:
            return False
        # uvicorn's websockets-sansio and wsproto protocols wait on a ``writable`` event,
        # cleared by pause_writing and set by resume_writing. The size alone is not enough:
        # uvloop counts what libuv wrote in part without resuming the protocol.
        writable = getattr(self.protocol, "writable", None)
        if isinstance(writable, asyncio.Event):
            return writable.is_set()
        return queued <= low  # at or below the low-water mark, writing is not paused

    def closing(self) -> bool:
        """True once the server has begun closing the socket (frames would be refused)."""
        return self.transport.is_closing()

    def abort(self) -> None:
        """Drop the TCP connection (a client that does not read up to its close frame)."""
        self.transport.abort()


def asyncio_flow(send: Any) -> AsyncioFlow | None:
    """The ``AsyncioFlow`` of the asyncio transport behind ``send``; None under daphne."""
    protocol = find_protocol(send)
    transport = _asyncio_transport(protocol)
    return None if transport is None else AsyncioFlow(protocol, transport)


def buffered(protocol: Any) -> int:
    """Bytes written to daphne's ``protocol`` that are still in the server's buffers."""
    transport = getattr(protocol, "transport", None)
    if transport is None:
        return 0
    total = len(getattr(transport, "dataBuffer", b"")) - int(getattr(transport, "offset", 0))
    total += int(getattr(transport, "_tempDataLen", 0))
    for data, _sync in getattr(protocol, "send_queue", ()):  # autobahn's own (chopped) queue
        total += len(data)
    return total


def probe(send: Any) -> Probe | None:
    """A function returning the bytes queued for this connection; None when unknown."""
    protocol = find_protocol(send)
    if protocol is None:
        return None
    transport = _asyncio_transport(protocol)
    if transport is not None:
        return transport.get_write_buffer_size
    return functools.partial(buffered, protocol)


def allow_close_grace(send: Any, seconds: float = SLOW_CLOSE_GRACE) -> None:
    """Give the client ``seconds`` to read up to the close frame before the TCP drop."""
    protocol = find_protocol(send)
    if protocol is not None and hasattr(protocol, "closeHandshakeTimeout"):  # autobahn's
        protocol.closeHandshakeTimeout = seconds
