"""The only user of the channel layer.

Each process (each running event loop) has one ``Hub``: one channel-layer channel, added to a
room's group while at least one local session has joined that room. A broadcast therefore
costs one layer message per process, not per connection, and the hub hands the pre-encoded
frame to its local sessions directly: no per-connection channel, queue, task or thread hop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol, TypeVar

from channels.layers import BaseChannelLayer, get_channel_layer

from realtime import metrics, store
from realtime.conf import conf

logger = logging.getLogger(__name__)

GROUP_PREFIX = "realtime.room."
MESSAGE = "realtime.message"
EPHEMERAL = "realtime.ephemeral"
CONTROL = "realtime.control"

# How long the hub holds a room's broadcast that arrived ahead of the seq it expects, waiting
# for the missing ones. Two processes that send into one room publish seq N and N + 1 from
# separate event loops, and a loop busy fanning out publishes late: without this window every
# local session would see the jump and read the gap from the database (one query per
# session), though the missing broadcast arrives a few milliseconds later. A broadcast the
# layer really lost costs this much latency before the sessions fill the gap as before.
REORDER_WINDOW = 0.05


T = TypeVar("T")


def room_group(room: str) -> str:
    """The channel-layer group name of a room."""
    return GROUP_PREFIX + room


class Subscriber(Protocol):
    """What a hub delivers to: a session (see session.py)."""

    async def deliver(self, room: str, seq: int, frame: str) -> bool: ...

    async def deliver_ephemeral(self, room: str, frame: str, exclude_user: Any) -> None: ...

    async def control(self, room: str, message: dict[str, Any]) -> None: ...


def get_layer() -> BaseChannelLayer:
    layer = get_channel_layer(conf.REALTIME_CHANNEL_LAYER)
    if layer is None:
        raise RuntimeError(
            f"CHANNEL_LAYERS has no {conf.REALTIME_CHANNEL_LAYER!r} layer (see realtime.E002)"
        )
    return layer


class Hub:
    """One process's (event loop's) subscription to room groups."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.rooms: dict[str, set[Subscriber]] = {}
        self.subscribed: set[str] = set()
        self.channel: str | None = None
        # Every open session of this loop (for live totals), and broadcast counters.
        self.sessions: weakref.WeakSet[Subscriber] = weakref.WeakSet()
        self.messages_received = 0
        self.deliveries = 0
        self._lock = asyncio.Lock()
        # Per room: the seq the hub expects next, and broadcasts held because they came early.
        self._next_seq: dict[str, int] = {}
        self._early: dict[str, dict[int, dict[str, Any]]] = {}
        self._deliver_lock = asyncio.Lock()
        self.reordered = 0  # broadcasts that arrived early and were put back in order
        self._tasks: list[asyncio.Task[None]] = []
        # Reads in flight that every local session asking for the same key shares (shared()).
        self._shared: dict[Hashable, asyncio.Future[Any]] = {}
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            MESSAGE: self._on_message,
            EPHEMERAL: self._on_ephemeral,
            CONTROL: self._on_control,
        }

    async def _start(self) -> str:
        if self.channel is None:
            self.channel = await self.layer.new_channel()
            self._tasks = [
                asyncio.create_task(self._receive_loop()),
                asyncio.create_task(self._refresh_loop()),
            ]
        return self.channel

    async def subscribe(self, room: str, subscriber: Subscriber) -> None:
        """Deliver the room's broadcasts to ``subscriber``; returns once the group is joined."""
        self.rooms.setdefault(room, set()).add(subscriber)
        if room in self.subscribed:
            return
        async with self._lock:
            if room in self.subscribed or subscriber not in self.rooms.get(room, ()):
                return
            channel = await self._start()
            await self.layer.group_add(room_group(room), channel)
            self.subscribed.add(room)

    async def unsubscribe(self, room: str, subscriber: Subscriber) -> None:
        """Stop delivering to ``subscriber``; leaves the group when nobody local is left."""
        subscribers = self.rooms.get(room)
        if subscribers is None:
            return
        subscribers.discard(subscriber)
        if subscribers:
            return
        del self.rooms[room]
        self._next_seq.pop(room, None)
        self._early.pop(room, None)
        async with self._lock:
            if room in self.rooms or room not in self.subscribed or self.channel is None:
                return
            self.subscribed.discard(room)
            try:
                await self.layer.group_discard(room_group(room), self.channel)
            except Exception:
                # Group membership expires on its own; failing to leave early is harmless.
                logger.warning("realtime: could not leave group of room %s", room, exc_info=True)

    async def _receive_loop(self) -> None:
        assert self.channel is not None
        backoff = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("realtime: channel layer receive failed; retrying", exc_info=True)
                # A restarted layer (Redis) may have lost every group: nothing would ever
                # arrive again unless the hub joins its rooms' groups anew, so rejoin (until
                # that works) before receiving again.
                while True:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    if await self._resubscribe():
                        break
                continue
            backoff = 0.1
            handler = self._handlers.get(message.get("type", ""))
            if handler is None:
                logger.warning("realtime: ignoring layer message of type %r", message.get("type"))
                continue
            await handler(message)

    async def _refresh_loop(self) -> None:
        # Layers expire group membership (channels-redis: group_expiry); refresh well before.
        while True:
            await asyncio.sleep(conf.REALTIME_GROUP_REFRESH)
            await self._resubscribe()

    async def _resubscribe(self) -> bool:
        """Join every subscribed room's group again; False when the layer failed."""
        for room in list(self.subscribed):
            try:
                await self.layer.group_add(room_group(room), self.channel or "")
            except Exception:
                logger.warning("realtime: could not rejoin the group of %s", room, exc_info=True)
                return False
        return True

    async def _on_message(self, message: dict[str, Any]) -> None:
        room, seq = message["room"], message["seq"]
        async with self._deliver_lock:
            expected = self._next_seq.get(room)
            if expected is not None and seq > expected:
                # Early: hold it for the missing seqs (one flush per room after the window).
                early = self._early.setdefault(room, {})
                if not early:
                    self.own(asyncio.create_task(self._flush_later(room)))
                early[seq] = message
                return
            await self._deliver(message)
            if expected is None or seq == expected:
                await self._deliver_held(room, seq + 1)

    async def _deliver_held(self, room: str, next_seq: int) -> None:
        """Deliver held broadcasts that now continue the room's seq; note what comes next."""
        early = self._early.get(room)
        while early and next_seq in early:
            self.reordered += 1
            await self._deliver(early.pop(next_seq))
            next_seq += 1
        if room in self.rooms:
            self._next_seq[room] = next_seq
        if not early:
            self._early.pop(room, None)

    async def _flush_later(self, room: str) -> None:
        await asyncio.sleep(REORDER_WINDOW)
        async with self._deliver_lock:
            early = self._early.pop(room, None)
            if not early:
                return
            # The missing seqs did not come: deliver in order; sessions fill the gap.
            for seq in sorted(early):
                await self._deliver(early[seq])
            if room in self.rooms:
                self._next_seq[room] = max(early) + 1

    async def _deliver(self, message: dict[str, Any]) -> None:
        room, seq, frame = message["room"], message["seq"], message["frame"]
        subscribers = list(self.rooms.get(room, ()))
        self.messages_received += 1
        self.deliveries += len(subscribers)
        written = 0
        for subscriber in subscribers:
            try:
                if await subscriber.deliver(room, seq, frame):
                    written += 1
            except Exception:
                logger.exception("realtime: delivery to a session failed")
        if written:
            metrics.count_out(frame, written)

    async def _on_ephemeral(self, message: dict[str, Any]) -> None:
        room, frame, exclude = message["room"], message["frame"], message.get("exclude_user")
        for subscriber in list(self.rooms.get(room, ())):
            try:
                await subscriber.deliver_ephemeral(room, frame, exclude)
            except Exception:
                logger.exception("realtime: delivery to a session failed")

    async def _on_control(self, message: dict[str, Any]) -> None:
        # Controls may read the database per session: run them beside the receive loop so
        # other rooms' broadcasts are not held up.
        room = message["room"]
        subscribers = list(self.rooms.get(room, ()))
        if subscribers:
            self.own(asyncio.create_task(self._control_all(room, subscribers, message)))

    async def _control_all(
        self, room: str, subscribers: list[Subscriber], message: dict[str, Any]
    ) -> None:
        for subscriber in subscribers:
            try:
                await subscriber.control(room, message)
            except Exception:
                logger.exception("realtime: control %s failed for a session", message.get("op"))

    async def shared(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        """``make()``'s result, computed once for all callers asking for ``key`` meanwhile.

        The first caller starts ``make()`` in a task of its own; whoever asks for the same key
        before it finishes awaits that task instead of starting another (a single flight). A
        caller that is cancelled stops waiting without cancelling it for the others; an
        exception reaches every caller. Nothing is kept once it is done: a later call for the
        key computes afresh.
        """
        future = self._shared.get(key)
        if future is None:
            future = asyncio.ensure_future(make())
            self._shared[key] = future
            future.add_done_callback(functools.partial(self._shared_done, key))
        return await asyncio.shield(future)

    def _shared_done(self, key: Hashable, future: asyncio.Future[Any]) -> None:
        if self._shared.get(key) is future:
            del self._shared[key]
        if not future.cancelled():
            future.exception()  # retrieved: each caller re-raises it, or nobody waits any more

    def own(self, task: asyncio.Task[None]) -> None:
        """Tie a background task of this loop to the hub, so stop() cancels it too."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(task)

    async def close(self) -> None:
        """Cancel the hub's tasks (tests and shutdown)."""
        self.stop()

    def stop(self) -> None:
        """Cancel the hub's tasks without waiting; a later subscribe starts it afresh."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.channel = None
        self.subscribed.clear()
        self._next_seq.clear()
        self._early.clear()


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def get_hub() -> Hub:
    """The hub of the running event loop, created on first use."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    layer = get_layer()
    if hub is None or hub.layer is not layer:
        if hub is not None:  # CHANNEL_LAYERS changed (tests): retire the old hub
            hub.stop()
        hub = _hubs[loop] = Hub(layer)
    return hub


def _pubsub_channel(layer: Any, group: str) -> str | None:
    """The Redis pub/sub channel of ``group`` when a PUBLISH from realtime's own Redis client
    reaches the layer's subscribers: channels-redis' pub/sub layer on one Redis host, which
    is the host store.py talks to. None for any other layer (use its group_send)."""
    direct = _direct.get(layer)
    if direct is None:
        hosts = getattr(layer, "_kwargs", {}).get("hosts") or [None]
        direct = _direct[layer] = (
            type(layer).__module__ == "channels_redis.pubsub"
            and len(hosts) == 1  # sharded, the layer picks the host per group
            and store.redis_host() is not None
        )
    return str(layer._get_group_channel_name(group)) if direct else None


_direct: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


async def _group_send(room: str, message: dict[str, Any]) -> None:
    layer = get_layer()
    group = room_group(room)
    channel = _pubsub_channel(layer, group)
    pipeline = store.auto_pipeline() if channel is not None else None
    if pipeline is None:
        await layer.group_send(group, message)
        return
    # The layer's own group_send is one PUBLISH per call; through the auto-pipeline the
    # broadcasts of concurrent sends share a round trip (store.AutoPipeline).
    await pipeline.execute("PUBLISH", channel, layer.serialize(message))


async def publish_message(room: str, seq: int, frame: str) -> None:
    """Broadcast a persisted message's pre-encoded frame to every process."""
    await _group_send(room, {"type": MESSAGE, "room": room, "seq": seq, "frame": frame})


async def publish_ephemeral(room: str, frame: str, exclude_user: Any = None) -> None:
    """Broadcast a frame that is not part of the timeline (typing)."""
    await _group_send(
        room, {"type": EPHEMERAL, "room": room, "frame": frame, "exclude_user": exclude_user}
    )


async def publish_control(room: str, op: str, **fields: Any) -> None:
    """Tell every session in the room, on every process, to act (recheck rights, kick)."""
    await _group_send(room, {"type": CONTROL, "room": room, "op": op, **fields})
