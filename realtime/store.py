"""The Redis that presence and rate limits share: the first host of realtime's channel layer.

Async clients are bound to an event loop, so there is one per running loop; the sync client
serves sync callers such as the admin. ``None`` means the layer is not Redis (the in-memory
layer of a single process), and callers use their in-memory backends.
"""

from __future__ import annotations

import asyncio
import hashlib
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


class AutoPipeline:
    """Commands issued in the same event-loop turn go to Redis as one pipeline.

    Every connection's send checks a rate limit and publishes a message: one round trip each,
    paid per send (a socket write, a wake-up and a parse on both sides). Here a command joins
    a queue, and one flush per loop sends everything queued as one pipeline (not a
    transaction: each command succeeds or fails alone) and answers each caller with its own
    reply. While a flush waits for Redis, new commands queue for the next one, so the
    pipeline grows with the load; alone, a command waits for nothing (ioredis' "auto
    pipelining").
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing = False
        self.flushes = 0  # pipelines sent (for tests)
        # One connection, taken from the client's pool once and kept: flushes never overlap,
        # and a pool checkout per flush (its lock, its check for unread data) and redis-py's
        # Pipeline cost about as much CPU as the round trip itself.
        self._connection: Any = None

    async def execute(self, *args: Any) -> Any:
        """Run one command (``"PUBLISH", channel, data``); its reply, or its error raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._start)
        return await future

    def _start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        _flush_tasks.add(task)
        task.add_done_callback(_flush_tasks.discard)

    async def _flush(self) -> None:
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                self.flushes += 1
                try:
                    replies = await self._run([args for args, _ in batch])
                except Exception as exc:
                    replies = [exc] * len(batch)
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # the caller was cancelled
                        continue
                    if isinstance(reply, BaseException):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except BaseException:  # cancelled (the loop is closing): nobody is left hanging
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue = []
            raise
        finally:
            self._flushing = False

    async def _run(self, commands: list[tuple[Any, ...]], retry: bool = True) -> list[Any]:
        """Each command's reply, or its own error (an error reply fails only its caller)."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError

        connection = self._connection
        if connection is None:
            connection = self._connection = await self.client.connection_pool.get_connection()
        elif _stale(connection):  # Redis closed it (a restart), or asked for a reconnect
            await connection.disconnect(nowait=True)
        was_open = connection.is_connected
        packed = connection.pack_commands(commands)  # a bad argument fails here, unsent
        try:
            # Connects first if it is not (a new connection, or after an error).
            await connection.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            await connection.disconnect(nowait=True)
            if retry and was_open and isinstance(exc, RedisConnectionError):
                # The kept connection was dead before the write (its close not yet seen by
                # the loop): nothing reached Redis, so the batch goes again on a new one.
                # Never after a failed read: Redis may have run the commands.
                return await self._run(commands, retry=False)
            raise
        replies: list[Any] = []
        try:
            for args in commands:
                try:
                    replies.append(await self.client.parse_response(connection, args[0]))
                except ResponseError as exc:
                    replies.append(exc)
        except Exception as exc:
            # Timed out or cut mid-reply: what is left to read is unknown, so the connection
            # goes. The commands answered keep their replies; the others get the error.
            await connection.disconnect(nowait=True)
            return replies + [exc] * (len(commands) - len(replies))
        except BaseException:  # cancelled: the flush's callers are cancelled with it
            await connection.disconnect(nowait=True)
            raise
        return replies


_flush_tasks: set[asyncio.Task[None]] = set()  # strong references while flushes run


def _stale(connection: Any) -> bool:
    """Whether ``connection`` must be reconnected before use: Redis has closed it (its
    end-of-file already seen by the loop), or redis-py marked it for a reconnect."""
    reader = getattr(connection, "_reader", None)
    if reader is not None and reader.at_eof():
        return True
    should_reconnect = getattr(connection, "should_reconnect", None)
    return bool(should_reconnect()) if callable(should_reconnect) else False


_pipelines: weakref.WeakKeyDictionary[Any, AutoPipeline] = weakref.WeakKeyDictionary()


def pipeline_for(client: Any) -> AutoPipeline:
    """The auto-pipeline of ``client`` (an async client, so one event loop)."""
    pipeline = _pipelines.get(client)
    if pipeline is None:
        pipeline = _pipelines[client] = AutoPipeline(client)
    return pipeline


class Script:
    """A Lua script run with EVALSHA through the client's auto-pipeline (loaded on demand)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        pipeline = pipeline_for(client)
        try:
            return await pipeline.execute(*command)
        except NoScriptError:  # a new or restarted Redis: load it, then run it again
            await client.script_load(self.text)
            return await pipeline.execute(*command)


def auto_pipeline() -> AutoPipeline | None:
    """The running loop's auto-pipeline, or None without a Redis layer."""
    client = async_client()
    return None if client is None else pipeline_for(client)
