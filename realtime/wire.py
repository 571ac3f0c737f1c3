"""Writing encoded text frames straight to daphne's socket (the fan-out fast path).

Through ASGI, every frame a consumer sends goes through channels' send wrappers, daphne's
``handle_reply``, autobahn's framing and Twisted's write buffer, which registers the socket
with the event loop for every write and unregisters it once flushed. For a broadcast to
1,000 connections that is most of the server's CPU (docs/performance.md). The frame is the
same for every subscriber, so ``Writer`` frames it once (an unmasked RFC 6455 text frame:
servers never mask) and writes it with one ``socket.send``; only what the kernel does not
take goes to Twisted's buffer, which then flushes it as usual.

The fast path is taken only while it is exactly equivalent to daphne's own path: the
WebSocket is open, autobahn has nothing queued and no extension (permessage-deflate) is in
use, and the transport is a plain TCP connection. Anything else (TLS, a closing socket, another
ASGI server) makes ``write`` return None and the caller uses the ASGI ``send``. Bytes already
in Twisted's buffer are never overtaken: a frame then joins the end of that buffer.
"""

from __future__ import annotations

import pprint
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")

_OPEN = 3  # autobahn's WebSocketProtocol.STATE_OPEN
_GROUND = 0  # autobahn's SEND_STATE_GROUND: no fragmented message in progress

# The last frame built, with its text: a broadcast hands the same str object to every local
# subscriber. One tuple, replaced whole, so threads with loops of their own never mix halves.
_last: tuple[str | None, bytes] = (None, b"")


def text_frame(text: str) -> bytes:
    """``text`` as one final, unmasked WebSocket text frame."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def _frames(texts: Sequence[str]) -> bytes:
    return b"".join(map(text_frame, texts))


def _frame(text: str) -> bytes:
    global _last
    last = _last
    if last[0] is text:
        return last[1]
    frame = text_frame(text)
    _last = (text, frame)
    return frame


class Writer:
    """The fast path for one daphne WebSocket protocol (see the module docstring)."""

    __slots__ = ("protocol", "socket", "transport")

    def __init__(self, protocol: Any, transport: Any, sock: Any) -> None:
        self.protocol = protocol
        self.transport = transport
        self.socket = sock

    def write(self, text: str) -> int | None:
        """Send ``text``; the bytes left in the server's buffer, or None: use ASGI ``send``."""
        return self._send(_frame, text)

    def write_many(self, texts: Sequence[str]) -> int | None:
        """Send ``texts`` as consecutive frames in one write; as ``write``.

        For the frames of one reply (a join's ack and presence state): one system call, and
        one wake-up of the client, instead of one per frame."""
        return self._send(_frames, texts)

    def _send(self, build: Callable[[_T], bytes], what: _T) -> int | None:
        protocol, transport = self.protocol, self.transport
        if (
            protocol.state != _OPEN
            or protocol.send_queue
            or protocol.send_state != _GROUND
            or transport.disconnecting
            or not transport.connected
        ):
            return None
        data = build(what)
        queued: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        if queued:
            transport.write(data)  # behind what is already buffered: order kept
            return queued + len(data)
        try:
            sent: int = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The peer is gone: daphne's own path notices and reports the disconnect.
            return None
        if sent == len(data):
            return 0
        transport.write(data[sent:])
        return len(data) - sent


def writer_for(protocol: Any) -> Writer | None:
    """A ``Writer`` for a daphne protocol whose WebSocket is open, or None if unsupported."""
    if protocol is None:
        return None
    try:
        from twisted.internet import tcp
    except ImportError:  # pragma: no cover - not under daphne
        return None
    transport = getattr(protocol, "transport", None)
    if type(transport) is not tcp.Server or getattr(transport, "TLS", False):
        return None  # TLS, or a wrapping transport: its framing is not ours to skip
    if getattr(protocol, "_perMessageCompress", None) is not None:
        return None  # permessage-deflate negotiated: frames must be compressed
    needed = ("state", "send_queue", "send_state")
    if not all(hasattr(protocol, name) for name in needed):
        return None
    for name in ("dataBuffer", "offset", "_tempDataLen", "disconnecting", "connected"):
        if not hasattr(transport, name):
            return None
    sock = getattr(transport, "socket", None)
    if sock is None:
        return None
    return Writer(protocol, transport, sock)


class _Pformat:
    """``pprint.pformat(obj)``, computed only if a log line is actually formatted."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __str__(self) -> str:
        return pprint.pformat(self.obj)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def defer_handshake_log() -> None:
    """Stop autobahn from pretty-printing its options on every connection (~90 µs each).

    ``WebSocketProtocol._connectionMade`` builds a debug log line with ``pformat`` of every
    option whether or not debug logging is on. This swaps autobahn's module-level ``pformat``
    for one that, called from ``_connectionMade`` only, returns an object formatted when the
    log line is. Every other caller (and any autobahn whose method differs) gets ``pformat``.
    It also turns off the colouring of autobahn's log highlights (``_plain_highlights``).
    """
    _plain_highlights()
    try:
        from autobahn.websocket import protocol
    except ImportError:  # pragma: no cover - not under daphne
        return
    current = getattr(protocol, "pformat", None)
    method = getattr(protocol.WebSocketProtocol, "_connectionMade", None)
    if current is not pprint.pformat or method is None:
        return  # already swapped, or not the autobahn this was written for
    code = method.__code__

    def pformat(obj: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and sys._getframe(1).f_code is code:
            return _Pformat(obj)
        return pprint.pformat(obj, *args, **kwargs)

    protocol.pformat = pformat  # type: ignore[attr-defined,assignment]


def _plain_highlights() -> None:
    """autobahn's log highlights without click's colours (~3.5 µs less per debug call).

    autobahn builds the arguments of its debug lines (``hltype(self.dataReceived)``,
    ``hlval(self.peer)``, ...) on every read, write and handshake, logged or not, and colours
    them with click when click is importable (Celery, uvicorn and many tools install it). Off,
    the same text comes out uncoloured, which is what a log file or the journal wants anyway.
    """
    try:
        from autobahn import util
    except ImportError:  # pragma: no cover - not under daphne
        return
    if getattr(util, "_HAS_CLICK", None) is True:
        util._HAS_CLICK = False
