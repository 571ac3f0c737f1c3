import asyncio

import pytest
import redis.asyncio as aioredis

from realtime import presence
from realtime.presence import MemoryBackend, RedisBackend

from .servers import running_redis

ALICE = {"id": 1, "name": "alice"}
BOB = {"id": 2, "name": "bob"}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("presence-redis")) as server:
        yield server.url


@pytest.fixture(params=["memory", "redis"])
async def backend(request, monkeypatch):
    clock = Clock()
    if request.param == "memory":
        yield MemoryBackend(clock), clock
        return
    url = request.getfixturevalue("redis_url")
    monkeypatch.setattr(presence, "_clock", clock)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    yield RedisBackend(client), clock
    await client.aclose()


async def test_first_connection_joins_and_last_leaves(backend):
    store, _ = backend
    assert (await store.join("lobby", "c1", ALICE)).joins == [ALICE]
    assert (await store.join("lobby", "c2", ALICE)).joins == []
    assert await store.users("lobby") == [{**ALICE, "connections": 2}]
    assert (await store.leave("lobby", "c1")).leaves == []
    assert (await store.leave("lobby", "c2")).leaves == [ALICE]
    assert await store.users("lobby") == []


async def test_present_tells_which_users_have_a_connection_in_the_room(backend):
    store, _ = backend
    ids = [str(ALICE["id"]), str(BOB["id"])]
    assert await store.present("lobby", ids) == set()
    await store.join("lobby", "a1", ALICE)
    await store.join("lobby", "a2", ALICE)
    await store.join("news", "b1", BOB)  # another room
    assert await store.present("lobby", ids) == {str(ALICE["id"])}
    await store.leave("lobby", "a1")
    assert await store.present("lobby", ids) == {str(ALICE["id"])}  # one tab left
    await store.leave("lobby", "a2")
    assert await store.present("lobby", ids) == set()
    assert await store.present("lobby", []) == set()


async def test_users_are_listed_once_with_counts(backend):
    store, _ = backend
    for conn in ("a1", "a2", "a3"):
        await store.join("lobby", conn, ALICE)
    await store.join("lobby", "b1", BOB)
    assert await store.users("lobby") == [
        {**ALICE, "connections": 3},
        {**BOB, "connections": 1},
    ]
    assert await store.counts(["lobby", "team"]) == {"lobby": 2, "team": 0}


async def test_enter_joins_and_lists_the_users_in_one_step(backend):
    store, clock = backend
    await store.join("lobby", "b1", BOB)
    change, users = await store.enter("lobby", "a1", ALICE)
    assert change.joins == [ALICE] and change.leaves == []
    assert users == [{**ALICE, "connections": 1}, {**BOB, "connections": 1}]
    change, users = await store.enter("lobby", "a2", ALICE)
    assert change.joins == []
    assert users == [{**ALICE, "connections": 2}, {**BOB, "connections": 1}]
    clock.now += 1000  # everybody expired: the next enter sweeps them and reports the leaves
    change, users = await store.enter("lobby", "b2", BOB)
    assert sorted(u["id"] for u in change.leaves) == sorted([ALICE["id"], BOB["id"]])
    assert change.joins == [BOB]  # b1 expired with the rest: b2 is BOB's first again
    assert users == [{**BOB, "connections": 1}]


async def test_leaving_twice_or_unknown_changes_nothing(backend):
    store, _ = backend
    await store.join("lobby", "c1", ALICE)
    assert (await store.leave("lobby", "nope")).leaves == []
    assert (await store.leave("lobby", "c1")).leaves == [ALICE]
    assert (await store.leave("lobby", "c1")).leaves == []


async def test_connections_without_heartbeat_expire_and_are_announced(backend, settings):
    settings.REALTIME_PRESENCE_TTL = 20
    store, clock = backend
    await store.join("lobby", "dead", BOB)  # its process will stop heart-beating
    await store.join("lobby", "live", ALICE)
    clock.now += 15
    assert (await store.touch("lobby", ["live"], {"live": ALICE})).leaves == []
    clock.now += 10  # dead is 25 s old, live 10 s
    change = await store.touch("lobby", ["live"], {"live": ALICE})
    assert change.leaves == [BOB]
    assert await store.users("lobby") == [{**ALICE, "connections": 1}]


async def test_touch_recounts_a_connection_swept_while_its_process_stalled(backend, settings):
    settings.REALTIME_PRESENCE_TTL = 20
    store, clock = backend
    await store.join("lobby", "c1", ALICE)
    clock.now += 30
    swept = await store.join("lobby", "b1", BOB)  # any write sweeps
    assert swept.leaves == [ALICE]
    rejoined = await store.touch("lobby", ["c1"], {"c1": ALICE})
    assert rejoined.joins == [ALICE]


async def test_concurrent_first_connections_count_one_join(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    store = RedisBackend(client)
    changes = await asyncio.gather(*(store.join("lobby", f"c{i}", ALICE) for i in range(20)))
    assert sum(len(c.joins) for c in changes) == 1
    leaves = await asyncio.gather(*(store.leave("lobby", f"c{i}") for i in range(20)))
    assert sum(len(c.leaves) for c in leaves) == 1
    await client.aclose()


async def test_redis_keys_expire_when_a_room_is_abandoned(redis_url, settings):
    settings.REALTIME_PRESENCE_TTL = 20
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await RedisBackend(client).join("lobby", "c1", ALICE)
    ttls = [await client.ttl(key) for key in presence._keys("lobby")]
    assert all(0 < ttl <= 200 for ttl in ttls), ttls
    await client.aclose()


async def test_a_burst_of_leaves_waits_for_connections_instead_of_failing(redis_url, settings):
    # 3x the pool's connections at once, as when every connection of a process closes in the
    # same instant: redis-py's default pool refused the excess ("Too many connections").
    from realtime import store

    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [redis_url]},
        }
    }
    client = store.async_client()
    await client.flushdb()
    backend = RedisBackend(client)
    n = 3 * store.MAX_CONNECTIONS
    for i in range(n):
        await backend.join("lobby", f"c{i}", {"id": i, "name": f"u{i}"})
    async with asyncio.timeout(30):
        outcomes = await asyncio.gather(
            *(backend.leave("lobby", f"c{i}") for i in range(n)), return_exceptions=True
        )
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert await backend.users("lobby") == []
    await client.aclose()


# -- diffs: merged per room while one is being published ------------------------------------

CAROL = {"id": 3, "name": "carol"}


def test_merge_keeps_each_users_last_move():
    changes = [
        presence.Change(joins=[ALICE]),
        presence.Change(joins=[BOB]),
        presence.Change(leaves=[ALICE]),  # alice came and went: she left
        presence.Change(leaves=[CAROL]),
        presence.Change(joins=[CAROL]),  # carol went and came back: she is here
    ]
    merged = presence.merge(changes)
    assert (merged.joins, merged.leaves) == ([BOB, CAROL], [ALICE])


@pytest.fixture
def store(monkeypatch):
    """A fresh memory backend as the presence store (held diffs are checked against it)."""
    backend = MemoryBackend()
    monkeypatch.setattr(presence, "get_backend", lambda: backend)
    return backend


@pytest.fixture
def published(monkeypatch, store):
    """broker.publish_ephemeral recorded; each publish waits until ``gate`` is set."""
    sent = []
    gate = asyncio.Event()
    gate.set()

    async def publish(room, frame, exclude_user=None):
        sent.append((room, frame))
        await gate.wait()

    monkeypatch.setattr(presence.broker, "publish_ephemeral", publish)
    return sent, gate


async def test_a_lone_change_is_published_alone_and_returned(published):
    sent, _ = published
    frame = await presence.announce("lobby", presence.Change(joins=[ALICE]))
    assert sent == [("lobby", presence.diff_frame("lobby", presence.Change(joins=[ALICE])))]
    assert frame == sent[0][1]  # the joiner skips its own diff by this text
    assert await presence.announce("lobby", presence.Change()) is None
    assert len(sent) == 1


async def test_changes_of_one_turn_and_during_a_publish_are_merged(published, store):
    sent, gate = published
    await store.join("lobby", "carol-1", CAROL)  # the store agrees with the held moves below
    gate.clear()
    first = [
        asyncio.ensure_future(presence.announce("lobby", presence.Change(joins=[user])))
        for user in (ALICE, BOB)
    ]
    other_room = asyncio.ensure_future(presence.announce("news", presence.Change(joins=[ALICE])))
    for _ in range(100):  # bounded: until both rooms' first publishes have started
        if len(sent) == 2:
            break
        await asyncio.sleep(0)
    assert sorted(sent) == sorted(
        [
            ("lobby", presence.diff_frame("lobby", presence.Change(joins=[ALICE, BOB]))),
            ("news", presence.diff_frame("news", presence.Change(joins=[ALICE]))),
        ]
    )
    # While lobby's diff is in flight, more changes queue up for the next one.
    later = [
        asyncio.ensure_future(presence.announce("lobby", change))
        for change in (presence.Change(leaves=[ALICE]), presence.Change(joins=[CAROL]))
    ]
    await asyncio.sleep(0)
    assert len(sent) == 2
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*first, *later, other_room), 5) == [
        None,  # merged: not any one joiner's own diff
        None,  # held for the next diff: its caller does not wait for it
        None,
        None,
        presence.diff_frame("news", presence.Change(joins=[ALICE])),
    ]
    await wait_for_publishes(sent, 3)  # after the room's interval
    assert sent[2] == (
        "lobby",
        presence.diff_frame("lobby", presence.Change(joins=[CAROL], leaves=[ALICE])),
    )
    await asyncio.sleep(0.3)  # a bounded look for an extra publish (nothing is left queued)
    assert len(sent) == 3


async def wait_for_publishes(sent, count, seconds=5.0):
    deadline = asyncio.get_running_loop().time() + seconds
    while len(sent) < count:
        assert asyncio.get_running_loop().time() < deadline, sent
        await asyncio.sleep(0.005)


def announcer_task(room):
    return presence._announcers[asyncio.get_running_loop()].tasks.get(room)


async def test_a_room_holds_its_next_diff_for_the_interval(published, settings):
    sent, _ = published
    settings.REALTIME_PRESENCE_DIFF_INTERVAL = 60  # longer than this test
    first = await presence.announce("lobby", presence.Change(joins=[ALICE]))
    assert first == sent[0][1]  # a quiet room's change goes out at once
    # Within the interval: queued, not published, and the caller is not kept waiting.
    assert (
        await asyncio.wait_for(presence.announce("lobby", presence.Change(joins=[BOB])), 1) is None
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(sent) == 1
    # Other rooms are not held by lobby's interval.
    assert await presence.announce("news", presence.Change(joins=[BOB])) is not None
    assert len(sent) == 2
    for room in ("lobby", "news"):
        announcer_task(room).cancel()
    await asyncio.sleep(0)
    assert announcer_task("lobby") is None and announcer_task("news") is None


async def test_with_no_interval_the_next_diff_follows_its_publish(published, settings):
    sent, _ = published
    settings.REALTIME_PRESENCE_DIFF_INTERVAL = 0
    assert await presence.announce("lobby", presence.Change(joins=[ALICE])) is not None
    assert await presence.announce("lobby", presence.Change(joins=[BOB])) is not None
    assert [frame for _, frame in sent] == [
        presence.diff_frame("lobby", presence.Change(joins=[ALICE])),
        presence.diff_frame("lobby", presence.Change(joins=[BOB])),
    ]


async def test_a_failed_publish_fails_its_batch_only(published, monkeypatch):
    sent, _ = published
    real = presence.broker.publish_ephemeral
    calls = 0

    async def flaky(room, frame, exclude_user=None):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("redis is down")
        await real(room, frame)

    monkeypatch.setattr(presence.broker, "publish_ephemeral", flaky)
    failing = [
        asyncio.ensure_future(presence.announce("lobby", presence.Change(joins=[user])))
        for user in (ALICE, BOB)
    ]
    results = await asyncio.gather(*failing, return_exceptions=True)
    # The leading change's caller gets the error; bob's change rode along and nobody waited.
    assert [type(r) for r in results] == [ConnectionError, type(None)]
    assert await presence.announce("lobby", presence.Change(joins=[CAROL])) is not None
    assert sent == [("lobby", presence.diff_frame("lobby", presence.Change(joins=[CAROL])))]


def test_users_decoded_from_redis_are_fresh_dicts_every_time():
    counts = [b"1", b"2", b"2", b"1"]
    info = [b"1", b'{"id": 1, "name": "alice"}', b"2", b'{"id": 2, "name": "bob"}']
    first = presence._users_from(counts, info)
    assert first == [
        {"id": 1, "name": "alice", "connections": 2},
        {"id": 2, "name": "bob", "connections": 1},
    ]
    first[0]["name"] = "changed"
    first[0]["connections"] = 99
    assert presence._users_from(counts, info)[0] == {"id": 1, "name": "alice", "connections": 2}


async def test_a_held_diff_that_fails_is_logged(published, store, monkeypatch, settings, caplog):
    sent, _ = published
    await store.join("lobby", "bob-1", BOB)
    settings.REALTIME_PRESENCE_DIFF_INTERVAL = 0.01
    real = presence.broker.publish_ephemeral

    async def second_fails(room, frame, exclude_user=None):
        if sent:
            raise ConnectionError("redis is down")
        await real(room, frame)

    monkeypatch.setattr(presence.broker, "publish_ephemeral", second_fails)
    assert await presence.announce("lobby", presence.Change(joins=[ALICE])) is not None
    assert await presence.announce("lobby", presence.Change(joins=[BOB])) is None  # held
    deadline = asyncio.get_running_loop().time() + 5
    while announcer_task("lobby") is not None:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)
    assert "presence diff of lobby not published" in caplog.text
    assert len(sent) == 1


async def test_a_held_move_the_store_no_longer_agrees_with_is_dropped(published, store, settings):
    sent, _ = published
    settings.REALTIME_PRESENCE_DIFF_INTERVAL = 0.01
    await store.join("lobby", "alice-2", ALICE)  # alice came back through another process
    await store.join("lobby", "bob-1", BOB)
    assert await presence.announce("lobby", presence.Change(joins=[CAROL])) is not None
    # Held: alice's leave (she is back), bob's leave (he is back), carol's join (she has gone).
    await presence.announce("lobby", presence.Change(leaves=[ALICE]))
    await presence.announce("lobby", presence.Change(leaves=[BOB], joins=[CAROL]))
    await presence.announce("lobby", presence.Change(joins=[BOB]), wait=True)
    assert [frame for _, frame in sent] == [
        presence.diff_frame("lobby", presence.Change(joins=[CAROL])),
        presence.diff_frame("lobby", presence.Change(joins=[BOB])),
    ]


async def test_a_held_change_waits_for_its_publish_when_asked(published, settings):
    sent, _ = published
    settings.REALTIME_PRESENCE_DIFF_INTERVAL = 0.05
    assert await presence.announce("lobby", presence.Change(leaves=[BOB])) is not None
    # Returns only once the room's next diff, which carries it, is out (a closing session's
    # leave: the process may stop right after).
    assert await presence.announce("lobby", presence.Change(leaves=[ALICE]), wait=True) is None
    assert sent[-1] == ("lobby", presence.diff_frame("lobby", presence.Change(leaves=[ALICE])))
