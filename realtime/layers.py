"""Build CHANNEL_LAYERS entries for realtime, with the known traps handled."""

from __future__ import annotations

from typing import Any

# redis-py closes sockets idle past its timeout while channels-redis' core layer blocks 5 s
# in BRPOP on them: with that layer the socket timeout must exceed the block, or idle
# processes lose their receive loop (check W002). The same timeout bounds every Redis call
# of presence and rate limits (store.py).
SOCKET_TIMEOUT = 10
BRPOP_TIMEOUT = 5
GROUP_EXPIRY = 300  # the in-memory layer's


def channel_layer(redis_url: str | None) -> dict[str, Any]:
    """A CHANNEL_LAYERS["default"] value: Redis when ``redis_url`` is set, else in-memory.

    The in-memory layer only works within one process (development, ``make run``).
    """
    if not redis_url:
        return {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 10_000, "group_expiry": GROUP_EXPIRY},
        }
    # The pub/sub layer: a broadcast is one PUBLISH, and Redis pushes one copy to each
    # process subscribed to the room (one hub per process, broker.py). The core layer costs
    # ~460 µs of CPU per group_send and ~470 µs per receive in each process (msgpack, a Lua
    # script, a sorted set of members and a list per channel); the pub/sub layer ~140 µs in
    # all (docs/performance.md). Subscriptions live on the connection: a crashed process
    # leaves no group entry or queue behind, and nothing in Redis expires.
    return {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [{"address": redis_url, "socket_timeout": SOCKET_TIMEOUT}]},
    }
