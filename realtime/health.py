"""``GET /healthz``: does this process reach its database and its channel layer?

200 with one entry per dependency when both answer; 503 naming the failing parts otherwise,
or while the process drains (it is shutting down: send new clients elsewhere). Each probe is
bounded by ``PROBE_TIMEOUT`` so a hung dependency reports instead of hanging the check. Route
it in the host project's urls.py: ``path("healthz", realtime.health.healthz)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from django.db import connections
from django.http import HttpRequest, HttpResponse, JsonResponse

from realtime import broker, drain

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0
# A group nobody joins: a group_send to it is a full round trip to the layer's backend
# (Redis) that delivers nothing.
PROBE_GROUP = "realtime.healthz"


def _ping_database() -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _database() -> None:
    await database_sync_to_async(_ping_database)()


async def _channel_layer() -> None:
    await broker.get_layer().group_send(PROBE_GROUP, {"type": "realtime.healthz"})


async def _probe(check: Callable[[], Awaitable[None]], name: str) -> dict[str, Any]:
    started = time.monotonic()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await check()
    except TimeoutError:
        error = f"no answer within {PROBE_TIMEOUT:.0f} s"
    except Exception as exc:
        # The class names the fault without leaking addresses or credentials.
        logger.warning("realtime: health probe %s failed", name, exc_info=True)
        error = type(exc).__name__
    else:
        return {"status": "ok", "ms": round((time.monotonic() - started) * 1000, 1)}
    return {"status": "error", "error": error}


async def healthz(request: HttpRequest) -> HttpResponse:
    """Per-dependency status as JSON: 200 when all are ok, 503 naming what is not."""
    if request.method not in {"GET", "HEAD"}:
        response: HttpResponse = JsonResponse({"error": "method not allowed"}, status=405)
        response["Allow"] = "GET, HEAD"
        return response
    database, layer = await asyncio.gather(
        _probe(_database, "database"), _probe(_channel_layer, "channel_layer")
    )
    checks = {
        "database": database,
        "channel_layer": layer,
        "process": {
            "status": "draining" if drain.draining() else "ok",
            "connections": drain.live_count(),
        },
    }
    failing = [name for name, check in checks.items() if check["status"] != "ok"]
    body = {"status": "unavailable" if failing else "ok", "failing": failing, "checks": checks}
    response = JsonResponse(body, status=503 if failing else 200)
    response["Cache-Control"] = "no-store"
    return response
