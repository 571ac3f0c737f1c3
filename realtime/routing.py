"""WebSocket routes and the ASGI application helper."""

from __future__ import annotations

from typing import Any

from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path

from realtime import gcfreeze, wire
from realtime.auth import ConnectionCaps, OriginCheck, TicketAuth, install_log_redaction
from realtime.consumers import RealtimeConsumer
from realtime.sessionauth import SessionAuthStack
from realtime.sse import drain_shield

websocket_urlpatterns = [
    path("ws/", RealtimeConsumer.as_asgi()),
]


def tune_handshakes() -> None:
    """Mask tickets in daphne's access log and Django's log handlers, and defer autobahn's
    per-connection debug formatting (wire.defer_handshake_log). Idempotent."""
    install_log_redaction()
    wire.defer_handshake_log()


def websocket_application() -> Any:
    """The WebSocket routes behind the Origin check, session or ticket auth and connection caps.

    See docs/security.md. Also applies ``tune_handshakes()``.
    """
    tune_handshakes()
    return OriginCheck(
        SessionAuthStack(TicketAuth(ConnectionCaps(URLRouter(websocket_urlpatterns))))
    )


def get_asgi_application(http_application: Any = None) -> ProtocolTypeRouter:
    """Wrap a project's HTTP ASGI app and add realtime's WebSocket routes.

    Call it in asgi.py after ``django.setup()`` (``django.core.asgi.get_asgi_application()``
    does that), passing the project's existing HTTP application. Once the application is
    built, the heap so far is frozen out of full garbage collections (gcfreeze.py,
    ``REALTIME_GC_FREEZE``).
    """
    if http_application is None:
        from django.core.asgi import get_asgi_application as django_asgi

        http_application = django_asgi()
    # In-flight HTTP requests (SSE streams, long-polls) end cleanly when the process drains.
    http_application = drain_shield(http_application)
    application = ProtocolTypeRouter(
        {"http": http_application, "websocket": websocket_application()}
    )
    gcfreeze.freeze_startup_heap()
    return application
