"""Metrics, declared once (prometheus_client), and the ``/realtime/metrics`` view.

With several processes, set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory shared by
every daphne process of a host (before they start): each process writes its values there and
any process's ``/realtime/metrics`` reports the sum. Without it, each process reports only
its own values, so scrape every process directly. See docs/metrics.md.
"""

from __future__ import annotations

import hmac
import os

from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from realtime.conf import conf
from realtime.protocol import ErrorCode

CONNECTIONS = Gauge(
    "realtime_connections",
    "Open realtime connections.",
    multiprocess_mode="livesum",
)
JOINS = Counter("realtime_joins_total", "Successful room joins.")
FRAMES_IN = Counter("realtime_frames_in_total", "Client frames received, by type.", ["type"])
FRAMES_OUT = Counter("realtime_frames_out_total", "Frames sent to clients, by type.", ["type"])
ERRORS = Counter("realtime_errors_total", "Error frames sent, by code.", ["code"])
MESSAGES_PERSISTED = Counter("realtime_messages_persisted_total", "Messages stored.")
PUBLISH_SECONDS = Histogram(
    "realtime_publish_seconds",
    "Time to store, broadcast and ack one client send.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
GAP_FILLS = Counter("realtime_gap_fills_total", "Sequence gaps filled from the database.")
SLOW_CONSUMER_CLOSES = Counter(
    "realtime_slow_consumer_closes_total", "Connections closed as slow consumers (4008)."
)

_out: dict[str, Counter] = {}


def count_out(text: str, count: int = 1) -> None:
    """Count ``count`` copies of one frame sent to clients."""
    kind = frame_type(text)
    child = _out.get(kind)
    if child is None:
        child = _out[kind] = FRAMES_OUT.labels(kind)
    child.inc(count)


def frame_type(text: str) -> str:
    """The type of an encoded server frame (protocol.encode writes ``type`` first)."""
    if text.startswith('{"type":"'):
        end = text.find('"', 9)
        if end > 0:
            return text[9:end]
    return "unknown"


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def _allowed(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_staff:
        return True
    token = conf.REALTIME_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if not token or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].encode(), token.encode())


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text format, for staff users or ``Authorization: Bearer <token>``."""
    if request.method != "GET":
        return JsonResponse(
            {"error": {"code": ErrorCode.BAD_FRAME, "message": "use GET"}}, status=405
        )
    if not _allowed(request):
        return JsonResponse(
            {
                "error": {
                    "code": ErrorCode.FORBIDDEN,
                    "message": "staff login or REALTIME_METRICS_TOKEN bearer token required",
                }
            },
            status=403,
        )
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)
