"""A minimal WebSocket client on asyncio.Protocol, cheap enough to drive thousands of sockets.

The load generator must not be the bottleneck, so this client does no more than a benchmark
needs: one fixed handshake (no extensions, so no compression), unmasked server frames parsed
straight out of a bytearray, client frames masked with an all-zero key (valid per RFC 6455,
and it makes masking a no-op), pings answered, and text frames handed to a callback as bytes.
Frames carrying a benchmark marker are recognised with one ``bytes.find`` instead of a JSON
decode; everything else (acks, hello, presence) is decoded with ``json.loads``.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any, cast

HANDSHAKE_TIMEOUT = 30.0
_ZERO_MASK = b"\x00\x00\x00\x00"


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (FIN set) with an all-zero masking key."""
    length = len(payload)
    head = bytes([0x80 | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    return head + _ZERO_MASK + payload


class Connection(asyncio.Protocol):
    """One WebSocket connection; ``on_text(conn, payload)`` gets every complete text frame."""

    def __init__(self, request: bytes, on_text: Callable[[Connection, bytes], None]) -> None:
        self.request = request
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.closed = False
        self.close_code: int | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._buf = bytearray()
        self._fragments: bytearray | None = None
        # Per-connection state the scenarios use (room, counters, waiters by ref).
        self.state: dict[str, Any] = {}
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            del buf[: end + 4]
            if b" 101 " not in status + b" ":
                self._fail(ConnectionError(f"handshake refused: {status.decode(errors='replace')}"))
                return
            self.open = True
            if not self.opened.done():
                self.opened.set_result(None)
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            end = pos + header + length
            if end > size:
                break
            payload = bytes(buf[pos + header : end])
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1 and b0 & 0x80:
                self.on_text(self, payload)
            elif opcode in (0, 1, 2):
                self._fragment(opcode, bool(b0 & 0x80), payload)
            elif opcode == 9:
                self._write(encode_frame(0xA, payload))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self._write(encode_frame(0x8, payload[:2]))
                self.closed = True
        if pos:
            del buf[:pos]

    def _fragment(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == 1:
            self._fragments = bytearray(payload)
        elif opcode == 0 and self._fragments is not None:
            self._fragments += payload
        else:
            return  # binary frames are not part of the protocol
        if fin and self._fragments is not None:
            whole, self._fragments = bytes(self._fragments), None
            self.on_text(self, whole)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("connection closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- helpers ---------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
            self.opened.exception()  # the caller may be gone (timeout): never log it
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection closed"))
                waiter.exception()
        self.waiters.clear()
        if self.transport is not None and not self.open:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, text: str) -> None:
        """Queue one text frame (no await: the transport buffers)."""
        self._write(encode_frame(0x1, text.encode()))

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send_text(json.dumps(frame, separators=(",", ":")))

    def request_json(self, frame: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send a frame with ``ref`` and return a future for the reply carrying that ref."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[frame["ref"]] = future
        self.send_json(frame)
        return future

    def resolve(self, frame: dict[str, Any]) -> bool:
        """Hand a decoded reply to the waiter of its ref; False when nobody waits for it."""
        ref = frame.get("ref")
        if ref is None:
            return False
        waiter = self.waiters.pop(ref, None)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(frame)
        return True

    def close(self) -> None:
        """Send a close frame and drop the socket."""
        if self.transport is None or self.transport.is_closing():
            return
        self._write(encode_frame(0x8, (1000).to_bytes(2, "big")))
        self.transport.close()


def handshake(host: str, port: int, path: str, cookie: str | None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: YmVuY2gtcmVhbHRpbWUwMQ==",
        "Sec-WebSocket-Version: 13",
        f"Origin: http://{host}:{port}",
    ]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def connect(
    host: str,
    port: int,
    path: str,
    cookie: str | None,
    on_text: Callable[[Connection, bytes], None],
    within: float = HANDSHAKE_TIMEOUT,
) -> Connection:
    """Open a WebSocket; returns once the server accepted the upgrade."""
    loop = asyncio.get_running_loop()
    request = handshake(host, port, path, cookie)
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: Connection(request, on_text), host, port), within
    )
    try:
        await asyncio.wait_for(asyncio.shield(conn.opened), within)
    except BaseException:
        conn.close()
        if conn.transport is not None:
            conn.transport.abort()
        raise
    return conn
