"""Build CHANNEL_LAYERS entries for realtime, with the known traps handled."""

from __future__ import annotations

from typing import Any

# redis-py closes sockets idle past its timeout while channels-redis blocks 5 s in BRPOP on
# them: the socket timeout must exceed that block or idle processes lose their receive loop.
SOCKET_TIMEOUT = 10
BRPOP_TIMEOUT = 5
GROUP_EXPIRY = 300


def channel_layer(redis_url: str | None) -> dict[str, Any]:
    """A CHANNEL_LAYERS["default"] value: Redis when ``redis_url`` is set, else in-memory.

    The in-memory layer only works within one process (development, ``make run``).
    """
    if not redis_url:
        return {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 10_000, "group_expiry": GROUP_EXPIRY},
        }
    return {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [{"address": redis_url, "socket_timeout": SOCKET_TIMEOUT}],
            # One hub channel per process carries every room's broadcasts (broker.py), so
            # its queue must hold bursts for all rooms of the process.
            "capacity": 10_000,
            "expiry": 60,
            # A crashed process's hub channel leaves every group within this many seconds;
            # live hubs rejoin every REALTIME_GROUP_REFRESH (60 s), well before.
            "group_expiry": GROUP_EXPIRY,
        },
    }
