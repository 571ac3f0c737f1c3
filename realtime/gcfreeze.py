"""Keep the startup heap out of the cyclic garbage collector's full passes (``gc.freeze``).

A full (generation 2) collection walks every tracked object in the process, and the event
loop stands still meanwhile. A Django process holds about 100,000 of them before its first
connection (modules, classes, functions, URL patterns, settings), and walking them is slow
(scattered in memory: about 40 ms here), so every full collection under load put that pause
on the latency of every message in flight (docs/performance.md: rooms p99 72 to 141 ms with
it, 22 to 32 ms without).

``freeze_startup_heap()``, called once by ``realtime.routing.get_asgi_application()``,
collects what is already garbage, then moves everything still alive into the permanent
generation that collections skip. Those objects live as long as the process anyway; they
are still freed by reference counting, only a reference cycle among them is never collected.
Set ``REALTIME_GC_FREEZE = False`` to leave the collector alone.
"""

from __future__ import annotations

import gc
import logging

from realtime.conf import conf

logger = logging.getLogger(__name__)

_frozen = False


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; once per process. The objects frozen
    (0 when disabled by ``REALTIME_GC_FREEZE`` or already done)."""
    global _frozen
    if _frozen or not conf.REALTIME_GC_FREEZE:
        return 0
    _frozen = True
    gc.collect()
    before = gc.get_freeze_count()
    gc.freeze()
    count = gc.get_freeze_count() - before
    logger.debug("realtime: froze %d objects of the startup heap", count)
    return count
