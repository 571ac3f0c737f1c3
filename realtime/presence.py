"""Who is online, per room, across processes.

Shaped like Phoenix presence: a joiner gets the full state once, then everybody gets diffs of
users joining (their first connection) and leaving (their last). One entry per user, with a
connection count.

The Redis backend keeps, per room, a sorted set of connection ids scored by expiry time, plus
per-user connection counts. Every process refreshes its own connections' expiry every
``REALTIME_PRESENCE_TTL / 4`` seconds and sweeps expired connections out, so the users of a
crashed process disappear within about ``REALTIME_PRESENCE_TTL`` seconds. Each change runs as
one Lua script, so concurrent processes never both count a "first" or "last" connection.
The memory backend does the same within one process (the development default).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from realtime import broker, store
from realtime.conf import conf
from realtime.protocol import ServerType, encode

logger = logging.getLogger(__name__)

User = dict[str, Any]  # {"id": ..., "name": ...}

KEY_PREFIX = "realtime:presence:"


@dataclass
class Change:
    """What one presence operation did: who came online, who went offline."""

    joins: list[User] = field(default_factory=list)
    leaves: list[User] = field(default_factory=list)


class Backend(Protocol):
    async def join(self, room: str, conn: str, user: User) -> Change: ...

    async def enter(self, room: str, conn: str, user: User) -> tuple[Change, list[User]]: ...

    async def leave(self, room: str, conn: str) -> Change: ...

    async def touch(self, room: str, conns: list[str], users: dict[str, User]) -> Change: ...

    async def users(self, room: str) -> list[User]: ...

    async def counts(self, rooms: list[str]) -> dict[str, int]: ...

    async def present(self, room: str, user_ids: list[str]) -> set[str]: ...


def _clock() -> float:
    return time.time()


class MemoryBackend:
    """Presence within one process (with the in-memory channel layer)."""

    def __init__(self, clock: Callable[[], float] = _clock) -> None:
        self.clock = clock
        # room -> conn -> (user id key, expiry)
        self.conns: dict[str, dict[str, tuple[str, float]]] = {}
        self.info: dict[str, dict[str, User]] = {}

    def _sweep(self, room: str) -> Change:
        now = self.clock()
        change = Change()
        conns = self.conns.get(room, {})
        for conn, (_, expiry) in list(conns.items()):
            if expiry <= now:
                change.leaves.extend(self._remove(room, conn).leaves)
        return change

    def _remove(self, room: str, conn: str) -> Change:
        conns = self.conns.get(room, {})
        entry = conns.pop(conn, None)
        if entry is None:
            return Change()
        uid = entry[0]
        if any(other_uid == uid for other_uid, _ in conns.values()):
            return Change()
        user = self.info.get(room, {}).pop(uid, None)
        if not conns:
            self.conns.pop(room, None)
            self.info.pop(room, None)
        return Change(leaves=[user] if user else [])

    async def join(self, room: str, conn: str, user: User) -> Change:
        change = self._sweep(room)
        uid = str(user["id"])
        conns = self.conns.setdefault(room, {})
        first = all(other_uid != uid for other_uid, _ in conns.values())
        conns[conn] = (uid, self.clock() + conf.REALTIME_PRESENCE_TTL)
        self.info.setdefault(room, {})[uid] = user
        if first:
            change.joins.append(user)
        return change

    async def enter(self, room: str, conn: str, user: User) -> tuple[Change, list[User]]:
        change = await self.join(room, conn, user)
        return change, await self.users(room)

    async def leave(self, room: str, conn: str) -> Change:
        return self._remove(room, conn)

    async def touch(self, room: str, conns: list[str], users: dict[str, User]) -> Change:
        change = self._sweep(room)
        expiry = self.clock() + conf.REALTIME_PRESENCE_TTL
        for conn in conns:
            entry = self.conns.get(room, {}).get(conn)
            if entry is not None:
                self.conns[room][conn] = (entry[0], expiry)
            elif conn in users:  # swept while this process stalled: count it again
                rejoined = await self.join(room, conn, users[conn])
                change.joins.extend(rejoined.joins)
        return change

    async def users(self, room: str) -> list[User]:
        counts: dict[str, int] = {}
        for uid, _ in self.conns.get(room, {}).values():
            counts[uid] = counts.get(uid, 0) + 1
        info = self.info.get(room, {})
        return [{**info[uid], "connections": n} for uid, n in sorted(counts.items())]

    async def counts(self, rooms: list[str]) -> dict[str, int]:
        return {room: len(await self.users(room)) for room in rooms}

    async def present(self, room: str, user_ids: list[str]) -> set[str]:
        """Which of ``user_ids`` (str) have a connection in the room now."""
        here = {uid for uid, _ in self.conns.get(room, {}).values()}
        return here.intersection(user_ids)


def diff_frame(room: str, change: Change) -> str:
    """Encode a ``presence_diff`` frame."""
    return encode(
        {
            "type": ServerType.PRESENCE_DIFF,
            "room": room,
            "joins": change.joins,
            "leaves": change.leaves,
        }
    )


def merge(changes: list[Change]) -> Change:
    """One change with the same end state as ``changes`` in order: each user's last move."""
    last: dict[Any, tuple[bool, User]] = {}
    for change in changes:
        for user in change.joins:
            last.pop(user["id"], None)
            last[user["id"]] = (True, user)
        for user in change.leaves:
            last.pop(user["id"], None)
            last[user["id"]] = (False, user)
    merged = Change()
    for joined, user in last.values():
        (merged.joins if joined else merged.leaves).append(user)
    return merged


class _Announcer:
    """One event loop's presence diffs: per room, at most one diff per interval.

    The first change of a quiet room is published at once (in the next loop turn, merged with
    any change of the same turn), and its caller waits for that publish. The room then holds
    its diffs until that publish is done and ``REALTIME_PRESENCE_DIFF_INTERVAL`` seconds have
    passed: changes meanwhile queue up and go out together as the next diff (``merge``). A
    lone change is published at once, as before; a burst of joins (a reconnect storm, a busy
    room) costs each member about one diff per interval instead of one per join.

    A held diff is checked against the presence store just before it goes out, and a move
    that is no longer true is dropped: a user whose leave was held here while they came back
    through another process (which announced the join at once) must not be shown as gone.
    Callers of held changes wait for the publish only if they ask to (a leave on close does:
    a process that stops must not lose it); a joiner does not.
    """

    # No reference to the loop: the loop is the key of a weak dictionary holding this.
    def __init__(self) -> None:
        self.queued: dict[str, list[tuple[Change, asyncio.Future[str | None] | None]]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, room: str, change: Change, wait: bool) -> asyncio.Future[str | None] | None:
        """Queue ``change``: a future of its publish when it leads or ``wait``, else None."""
        loop = asyncio.get_running_loop()
        if room in self.tasks:
            held: asyncio.Future[str | None] | None = loop.create_future() if wait else None
            self.queued.setdefault(room, []).append((change, held))
            return held
        waiter: asyncio.Future[str | None] = loop.create_future()
        self.queued[room] = [(change, waiter)]
        self.tasks[room] = loop.create_task(self._publish(room), context=contextvars.Context())
        return waiter

    async def _publish(self, room: str) -> None:
        held = False  # the first batch goes at once; the later ones were held
        try:
            while batch := self.queued.pop(room, None):
                waiters = [waiter for _, waiter in batch if waiter is not None]
                change = merge([change for change, _ in batch])
                frame = None
                try:
                    if held:
                        change = await _still_true(room, change)
                    if change.joins or change.leaves:
                        frame = diff_frame(room, change)
                        await broker.publish_ephemeral(room, frame)
                except Exception as exc:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    if not waiters:  # nobody waits to log it
                        logger.warning(
                            "realtime: presence diff of %s not published", room, exc_info=True
                        )
                    continue
                except BaseException:
                    for waiter in waiters:
                        waiter.cancel()
                    raise
                # The frame sent for one change only (a joiner skips its own diff by it).
                sent = frame if len(batch) == 1 and not held else None
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(sent)
                if conf.REALTIME_PRESENCE_DIFF_INTERVAL > 0:
                    await asyncio.sleep(conf.REALTIME_PRESENCE_DIFF_INTERVAL)
                    held = True
        finally:
            del self.tasks[room]
            for _, left in self.queued.pop(room, ()):  # cancelled (the loop is closing)
                if left is not None:
                    left.cancel()


async def _still_true(room: str, change: Change) -> Change:
    """The moves of ``change`` that the presence store still agrees with."""
    ids = [str(user["id"]) for user in (*change.joins, *change.leaves)]
    present = await get_backend().present(room, ids)
    return Change(
        joins=[u for u in change.joins if str(u["id"]) in present],
        leaves=[u for u in change.leaves if str(u["id"]) not in present],
    )


_announcers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Announcer] = (
    weakref.WeakKeyDictionary()
)


async def announce(room: str, change: Change, wait: bool = False) -> str | None:
    """Broadcast a presence change to the room, if there is one.

    Returns the frame sent when it carried this change alone (None when merged with others
    or held for the room's next diff, see ``_Announcer``, or when there was nothing to send).
    A held change returns at once unless ``wait``: then when its diff has been published."""
    if not (change.joins or change.leaves):
        return None
    loop = asyncio.get_running_loop()
    announcer = _announcers.get(loop)
    if announcer is None:
        announcer = _announcers[loop] = _Announcer()
    waiter = announcer.add(room, change, wait)
    return None if waiter is None else await waiter


# Lua: KEYS = exp (zset conn->expiry), conn (hash conn->uid), cnt (hash uid->n), info (hash
# uid->json). Every script first sweeps expired connections and reports the users that left.
_SWEEP = """
local leaves = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, c in ipairs(expired) do
  redis.call('ZREM', KEYS[1], c)
  local u = redis.call('HGET', KEYS[2], c)
  redis.call('HDEL', KEYS[2], c)
  if u then
    if redis.call('HINCRBY', KEYS[3], u, -1) <= 0 then
      redis.call('HDEL', KEYS[3], u)
      table.insert(leaves, redis.call('HGET', KEYS[4], u) or '')
      redis.call('HDEL', KEYS[4], u)
    end
  end
end
"""
_KEEP = """
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
"""
# ARGV: now, key ttl, conn, uid, info json, expiry
JOIN_SCRIPT = (
    _SWEEP
    + """
local first = 0
if redis.call('ZADD', KEYS[1], ARGV[6], ARGV[3]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  if redis.call('HINCRBY', KEYS[3], ARGV[4], 1) == 1 then first = 1 end
end
redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])
"""
    + _KEEP
    + "return {first, leaves}"
)
# JOIN_SCRIPT, then the room's users in the same step: {first, leaves, counts, info}
_USERS = "redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])"
ENTER_SCRIPT = JOIN_SCRIPT.replace(
    "return {first, leaves}", "return {first, leaves, " + _USERS + "}"
)
USERS_SCRIPT = "return {" + _USERS + "}"
# ARGV: now, key ttl, conn
LEAVE_SCRIPT = (
    _SWEEP
    + """
if redis.call('ZREM', KEYS[1], ARGV[3]) == 1 then
  local u = redis.call('HGET', KEYS[2], ARGV[3])
  redis.call('HDEL', KEYS[2], ARGV[3])
  if u and redis.call('HINCRBY', KEYS[3], u, -1) <= 0 then
    redis.call('HDEL', KEYS[3], u)
    table.insert(leaves, redis.call('HGET', KEYS[4], u) or '')
    redis.call('HDEL', KEYS[4], u)
  end
end
return leaves
"""
)
# ARGV: now, key ttl, expiry, conn1, conn2, ...; returns leaves and the conns that were missing
TOUCH_SCRIPT = (
    _SWEEP
    + """
local missing = {}
for i = 4, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[3], ARGV[i]) == 0 then
    if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then table.insert(missing, ARGV[i]) end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
"""
    + _KEEP
    + """
end
return {leaves, missing}
"""
)


def _keys(room: str) -> list[str]:
    base = KEY_PREFIX + room
    return [base + ":exp", base + ":conn", base + ":cnt", base + ":info"]


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _decode_users(raw: list[Any]) -> list[User]:
    return [json.loads(text) for text in map(_text, raw) if text]


@functools.lru_cache(maxsize=4096)
def _user_info(data: str) -> User:
    # Shared between calls: callers copy it ({**info, ...}) and never change it.
    return json.loads(data)  # type: ignore[no-any-return]


def _users_from(counts: list[Any], info: list[Any]) -> list[User]:
    """The users of a room from its HGETALL replies (flat [field, value, ...] lists)."""
    names = {_text(uid): _text(data) for uid, data in zip(info[0::2], info[1::2], strict=True)}
    users = []
    for uid, n in zip(counts[0::2], counts[1::2], strict=True):
        data = names.get(_text(uid))
        if data is not None:
            users.append({**_user_info(data), "connections": int(n)})
    return sorted(users, key=lambda u: str(u["id"]))


_JOIN = store.Script(JOIN_SCRIPT)
_ENTER = store.Script(ENTER_SCRIPT)
_LEAVE = store.Script(LEAVE_SCRIPT)
_TOUCH = store.Script(TOUCH_SCRIPT)
_USERS_OF = store.Script(USERS_SCRIPT)


class RedisBackend:
    """Presence shared by every process through Redis.

    Each operation is one script through the loop's auto-pipeline (store.py), so the joins
    and leaves of a burst of connections share round trips."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @staticmethod
    def _key_ttl() -> int:
        return int(conf.REALTIME_PRESENCE_TTL * 10)

    def _join_args(self, conn: str, user: User) -> list[Any]:
        now = _clock()
        expiry = now + conf.REALTIME_PRESENCE_TTL
        return [now, self._key_ttl(), conn, str(user["id"]), json.dumps(user), expiry]

    async def join(self, room: str, conn: str, user: User) -> Change:
        first, leaves = await _JOIN(self.client, _keys(room), self._join_args(conn, user))
        return Change(joins=[user] if first else [], leaves=_decode_users(leaves))

    async def enter(self, room: str, conn: str, user: User) -> tuple[Change, list[User]]:
        reply = await _ENTER(self.client, _keys(room), self._join_args(conn, user))
        first, leaves, counts, info = reply
        change = Change(joins=[user] if first else [], leaves=_decode_users(leaves))
        return change, _users_from(counts, info)

    async def leave(self, room: str, conn: str) -> Change:
        leaves = await _LEAVE(self.client, _keys(room), [_clock(), self._key_ttl(), conn])
        return Change(leaves=_decode_users(leaves))

    async def touch(self, room: str, conns: list[str], users: dict[str, User]) -> Change:
        now = _clock()
        args = [now, self._key_ttl(), now + conf.REALTIME_PRESENCE_TTL, *conns]
        leaves, missing = await _TOUCH(self.client, _keys(room), args)
        change = Change(leaves=_decode_users(leaves))
        for raw in missing:
            conn = _text(raw)
            if conn in users:  # swept while this process stalled: count it again
                change.joins.extend((await self.join(room, conn, users[conn])).joins)
        return change

    async def users(self, room: str) -> list[User]:
        # No sweep here: the leaves a sweep finds must be announced, so only join, leave and
        # touch (whose callers broadcast the diff) sweep. An expired entry shows until then.
        counts, info = await _USERS_OF(self.client, _keys(room), [])
        return _users_from(counts, info)

    async def counts(self, rooms: list[str]) -> dict[str, int]:
        async with self.client.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.hlen(_keys(room)[2])
            results = await pipe.execute()
        return {room: int(n) for room, n in zip(rooms, results, strict=True)}

    async def present(self, room: str, user_ids: list[str]) -> set[str]:
        """Which of ``user_ids`` (str) have a connection in the room now."""
        if not user_ids:
            return set()
        counts = await self.client.hmget(_keys(room)[2], user_ids)
        return {uid for uid, n in zip(user_ids, counts, strict=True) if n and int(n) > 0}


_memory = MemoryBackend()
_redis = store.bound(RedisBackend)


def get_backend() -> Backend:
    """The presence backend for the running loop (Redis clients are bound to a loop)."""
    return _redis() or _memory


class Present(Protocol):
    """A hub subscriber that can be present in a room (session.Session)."""

    conn_id: str

    def presence_user(self, room: str) -> User | None: ...


async def touch_local(hub: broker.Hub) -> None:
    """Refresh this process's connections in every room it serves; announce what changed."""
    backend = get_backend()
    for room, subscribers in list(hub.rooms.items()):
        entries: dict[str, User] = {}
        for subscriber in subscribers:
            user = getattr(subscriber, "presence_user", lambda room: None)(room)
            if user is not None:
                entries[subscriber.conn_id] = user  # type: ignore[attr-defined]
        change = await backend.touch(room, list(entries), entries)
        await announce(room, change)


_keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


async def _keep(hub: broker.Hub) -> None:
    last = (time.monotonic(), hub.messages_received, hub.deliveries)
    while True:
        await asyncio.sleep(conf.REALTIME_PRESENCE_TTL / 4)
        try:
            await touch_local(hub)
            now = (time.monotonic(), hub.messages_received, hub.deliveries)
            await _publish_stats(hub, now, last)
            last = now
        except Exception:
            logger.warning("realtime: presence heartbeat failed", exc_info=True)


# -- live totals per process, for the admin ------------------------------------------------

STATS_KEY = "realtime:processes"
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"
_local_stats: dict[str, dict[str, Any]] = {}


async def _publish_stats(
    hub: broker.Hub, now: tuple[float, int, int], last: tuple[float, int, int]
) -> None:
    elapsed = max(now[0] - last[0], 1e-6)
    stats = {
        "process": PROCESS_ID,
        "connections": len(hub.sessions),
        "rooms": len(hub.rooms),
        "messages_per_s": round((now[1] - last[1]) / elapsed, 2),
        "deliveries_per_s": round((now[2] - last[2]) / elapsed, 2),
        "updated": _clock(),
    }
    _local_stats[PROCESS_ID] = stats
    backend = get_backend()
    if isinstance(backend, RedisBackend):
        await backend.client.hset(STATS_KEY, PROCESS_ID, json.dumps(stats))
        await backend.client.expire(STATS_KEY, int(conf.REALTIME_PRESENCE_TTL * 10))


def process_stats() -> list[dict[str, Any]]:
    """Live totals of every process seen within the presence TTL (sync, for the admin)."""
    client = store.sync_client()
    if client is None:
        rows = list(_local_stats.values())
    else:
        with client:
            rows = [json.loads(v) for v in client.hgetall(STATS_KEY).values()]
    fresh = _clock() - conf.REALTIME_PRESENCE_TTL
    return sorted((r for r in rows if r["updated"] >= fresh), key=lambda r: r["process"])


def online_counts(rooms: list[str]) -> dict[str, int]:
    """Users online per room (sync, for the admin)."""
    client = store.sync_client()
    if client is None:
        return {
            room: len({uid for uid, _ in _memory.conns.get(room, {}).values()}) for room in rooms
        }
    with client, client.pipeline(transaction=False) as pipe:
        for room in rooms:
            pipe.hlen(_keys(room)[2])
        return {room: int(n) for room, n in zip(rooms, pipe.execute(), strict=True)}


def ensure_keeper(hub: broker.Hub) -> None:
    """Start this loop's presence heartbeat once."""
    loop = asyncio.get_running_loop()
    task = _keepers.get(loop)
    if task is None or task.done():
        task = _keepers[loop] = loop.create_task(_keep(hub))
        hub.own(task)
