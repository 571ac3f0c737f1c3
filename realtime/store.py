"""The Redis that presence and rate limits share: the first host of realtime's channel layer.

Async clients are bound to an event loop, so there is one per running loop; the sync client
serves sync callers such as the admin. ``None`` means the layer is not Redis (the in-memory
layer of a single process), and callers use their in-memory backends.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings

from realtime.conf import conf
from realtime.layers import SOCKET_TIMEOUT


def redis_host() -> dict[str, Any] | None:
    """Connection arguments of the layer's first Redis host, or None if it is not Redis."""
    layer = getattr(settings, "CHANNEL_LAYERS", {}).get(conf.REALTIME_CHANNEL_LAYER, {})
    if not str(layer.get("BACKEND", "")).startswith("channels_redis"):
        return None
    hosts = layer.get("CONFIG", {}).get("hosts") or [("localhost", 6379)]
    host = hosts[0]
    if isinstance(host, str):
        found: dict[str, Any] = {"address": host}
    elif isinstance(host, dict):
        found = dict(host)
    else:
        found = {"host": host[0], "port": host[1]}
    found.setdefault("socket_timeout", SOCKET_TIMEOUT)
    return found


def _make(module: Any, host: dict[str, Any]) -> Any:
    host = dict(host)
    if "address" in host:
        return module.Redis.from_url(host.pop("address"), **host)
    return module.Redis(**host)


T = TypeVar("T")

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


def async_client() -> Any:
    """The running loop's redis.asyncio client, or None without a Redis layer."""
    host = redis_host()
    if host is None:
        return None
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = _async_client(host)
    return client


# Connections one loop's client may open at once. Past it a command waits for a free one
# (up to the socket timeout) instead of failing: redis-py's default pool raises "Too many
# connections" at once, and a burst of disconnects (a process draining, a network blip)
# runs one presence leave per connection at the same moment.
MAX_CONNECTIONS = 100


def _async_client(host: dict[str, Any]) -> Any:
    import redis.asyncio

    options = {"max_connections": MAX_CONNECTIONS, "timeout": SOCKET_TIMEOUT, **host}
    address = options.pop("address", None)
    blocking = redis.asyncio.BlockingConnectionPool
    pool = blocking(**options) if address is None else blocking.from_url(address, **options)
    return redis.asyncio.Redis(connection_pool=pool)


def sync_client() -> Any:
    """A new sync redis client (close it after use), or None without a Redis layer."""
    host = redis_host()
    if host is None:
        return None
    import redis

    return _make(redis, host)


def bound(factory: Callable[[Any], T]) -> Callable[[], T | None]:
    """A getter of one ``factory(client)`` per async Redis client (so per loop), or None
    when realtime's layer is not Redis."""
    made: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()

    def get() -> T | None:
        client = async_client()
        if client is None:
            return None
        value = made.get(client)
        if value is None:
            value = made[client] = factory(client)
        return value

    return get
