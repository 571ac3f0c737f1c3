"""What a connection has queued but its client has not taken yet (slow-consumer detection).

daphne writes every frame straight into the Twisted transport of the socket, which buffers
without limit while the client does not read. ``probe(send)`` finds that transport behind the
ASGI ``send`` callable (daphne passes ``partial(server.handle_reply, protocol)``; channels'
session middleware wraps it and keeps the original as ``real_send``) and returns a function
that reports the bytes still buffered, or None under another server.
"""

from __future__ import annotations

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
    """The daphne WebSocket protocol behind an ASGI ``send``, or None."""
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
            return None
        send = inner
    return None


def buffered(protocol: Any) -> int:
    """Bytes written to ``protocol`` that are still in the server's buffers."""
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
    return functools.partial(buffered, protocol)


def allow_close_grace(send: Any, seconds: float = SLOW_CLOSE_GRACE) -> None:
    """Give the client ``seconds`` to read up to the close frame before the TCP drop."""
    protocol = find_protocol(send)
    if protocol is not None:
        protocol.closeHandshakeTimeout = seconds
