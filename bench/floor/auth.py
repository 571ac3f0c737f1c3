"""daphne accepting WebSockets of logged-in users through realtime's session authentication.

The same Django settings, middleware and startup as the realtime stack (``tune_handshakes()``,
the heap frozen as ``get_asgi_application()`` freezes it); no room, no frame, no presence.
Anonymous handshakes are refused, so a connection the generator counts is one whose session
and user were read.
"""

from __future__ import annotations

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
django.setup()

from bench.floor._asgi import Receive, Send, accept_and_wait, http_ok  # noqa: E402
from realtime.gcfreeze import freeze_startup_heap  # noqa: E402
from realtime.routing import tune_handshakes  # noqa: E402
from realtime.sessionauth import SessionAuthStack  # noqa: E402


async def _logged_in_only(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    await accept_and_wait(receive, send, allowed=scope["user"].is_authenticated)


tune_handshakes()
_websocket = SessionAuthStack(_logged_in_only)


async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await http_ok(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)


freeze_startup_heap()
