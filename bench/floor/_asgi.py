"""The plain ASGI pieces the floors share: a health answer and an accept-and-wait socket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def http_ok(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """200 to any HTTP request (the harness polls /healthz until the server answers)."""
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


async def accept_and_wait(receive: Receive, send: Send, allowed: bool = True) -> None:
    """Answer the handshake (accept, or refuse with 403), then wait for the disconnect."""
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.connect":
            await send({"type": "websocket.accept" if allowed else "websocket.close"})
            if not allowed:
                return
        elif kind == "websocket.disconnect":
            return
