"""daphne accepting WebSockets with no application work: the floor of a handshake."""

from __future__ import annotations

from typing import Any

from bench.floor._asgi import Receive, Send, accept_and_wait, http_ok


async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await http_ok(scope, receive, send)
    elif scope["type"] == "websocket":
        await accept_and_wait(receive, send)
