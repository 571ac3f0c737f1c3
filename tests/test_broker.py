import asyncio

import pytest
from channels.layers import InMemoryChannelLayer, channel_layers

from realtime import broker

from .servers import running_redis


class Recorder:
    def __init__(self):
        self.got = []
        self.arrived = asyncio.Event()

    async def deliver(self, room, seq, frame):
        self.got.append((room, seq, frame))
        self.arrived.set()

    async def deliver_ephemeral(self, room, frame, exclude_user):
        self.got.append((room, None, frame))
        self.arrived.set()


class RestartingLayer(InMemoryChannelLayer):
    """The in-memory layer, with a switch that makes a pending receive fail once."""

    def __init__(self):
        super().__init__()
        self.crash = asyncio.Event()

    async def receive(self, channel):
        real = asyncio.ensure_future(super().receive(channel))
        crash = asyncio.ensure_future(self.crash.wait())
        done, _ = await asyncio.wait({real, crash}, return_when=asyncio.FIRST_COMPLETED)
        if real in done:
            crash.cancel()
            return real.result()
        real.cancel()
        self.crash.clear()
        raise ConnectionError("layer restarted")


async def send(layer, room, seq):
    await layer.group_send(
        broker.room_group(room),
        {"type": broker.MESSAGE, "room": room, "seq": seq, "frame": f"f{seq}"},
    )


async def lobby_hub():
    """A hub on a fresh layer with one subscriber in "lobby"."""
    layer = RestartingLayer()
    hub = broker.Hub(layer)
    sub = Recorder()
    await hub.subscribe("lobby", sub)
    return layer, hub, sub


async def wait_for(recorder, count):
    async with asyncio.timeout(5):
        while len(recorder.got) < count:
            recorder.arrived.clear()
            await recorder.arrived.wait()


async def test_one_group_membership_per_room_per_process():
    layer = RestartingLayer()
    hub = broker.Hub(layer)
    a, b = Recorder(), Recorder()
    await hub.subscribe("lobby", a)
    await hub.subscribe("lobby", b)
    assert list(layer.groups[broker.room_group("lobby")]) == [hub.channel]
    await send(layer, "lobby", 1)
    await wait_for(a, 1)
    await wait_for(b, 1)
    await hub.unsubscribe("lobby", a)
    assert broker.room_group("lobby") in layer.groups
    await hub.unsubscribe("lobby", b)
    assert not layer.groups.get(broker.room_group("lobby"))
    await hub.close()


async def test_hub_rejoins_groups_after_the_layer_restarts_empty():
    layer, hub, sub = await lobby_hub()
    await send(layer, "lobby", 1)
    await wait_for(sub, 1)
    await layer.flush()  # the restarted layer has no groups any more
    layer.crash.set()
    # Publish until the hub is back in the group (bounded), as a live room would.
    async with asyncio.timeout(5):
        seq = 2
        while len(sub.got) < 2:
            await send(layer, "lobby", seq)
            seq += 1
            await asyncio.sleep(0.05)
    assert sub.got[1][0] == "lobby"
    await hub.close()


async def test_messages_for_other_rooms_are_not_delivered():
    layer = RestartingLayer()
    hub = broker.Hub(layer)
    lobby, team = Recorder(), Recorder()
    await hub.subscribe("lobby", lobby)
    await hub.subscribe("team", team)
    await send(layer, "team", 1)
    await send(layer, "lobby", 1)
    await wait_for(lobby, 1)
    assert [g[0] for g in team.got] == ["team"]
    assert [g[0] for g in lobby.got] == ["lobby"]
    await hub.close()


async def test_a_broadcast_ahead_of_its_predecessor_waits_for_it():
    # Two processes publish seq 2 and 3 of one room; 3 reaches this hub first.
    layer, hub, sub = await lobby_hub()
    await send(layer, "lobby", 1)
    await wait_for(sub, 1)
    await send(layer, "lobby", 3)
    await asyncio.sleep(broker.REORDER_WINDOW / 5)
    assert [g[1] for g in sub.got] == [1]  # held, not handed on as a gap
    await send(layer, "lobby", 2)
    await wait_for(sub, 3)
    assert [g[1] for g in sub.got] == [1, 2, 3]
    assert hub.reordered == 1
    await hub.close()


async def test_a_broadcast_whose_predecessor_is_lost_comes_after_the_window():
    layer, hub, sub = await lobby_hub()
    await send(layer, "lobby", 1)
    await wait_for(sub, 1)
    await send(layer, "lobby", 4)  # 2 and 3 never come: the session fills them
    await send(layer, "lobby", 5)
    await wait_for(sub, 3)
    assert [g[1] for g in sub.got] == [1, 4, 5]
    await send(layer, "lobby", 6)  # and the hub follows on from 5
    await wait_for(sub, 4)
    assert [g[1] for g in sub.got] == [1, 4, 5, 6]
    await hub.close()


async def test_a_repeated_broadcast_is_handed_on_at_once():
    # A send retried with its client_msg_id is broadcast again with its old seq.
    layer, hub, sub = await lobby_hub()
    for seq in (1, 2, 1):
        await send(layer, "lobby", seq)
    await wait_for(sub, 3)
    assert [g[1] for g in sub.got] == [1, 2, 1]
    await hub.close()


# -- publishing through the auto-pipeline ------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("broker-redis")) as server:
        yield server.url


def _layer(settings, backend, hosts):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": backend, "CONFIG": {"hosts": hosts}}}
    channel_layers.backends.clear()
    return broker.get_layer()


PUBSUB = "channels_redis.pubsub.RedisPubSubChannelLayer"


async def test_only_a_one_host_pubsub_layer_is_published_to_directly(settings, redis_url):
    group = broker.room_group("lobby")
    layer = _layer(settings, PUBSUB, [redis_url])
    assert broker._pubsub_channel(layer, group) == layer._get_group_channel_name(group)
    two = _layer(settings, PUBSUB, [redis_url, redis_url + "/1"])
    assert broker._pubsub_channel(two, group) is None
    core = _layer(settings, "channels_redis.core.RedisChannelLayer", [redis_url])
    assert broker._pubsub_channel(core, group) is None
    assert broker._pubsub_channel(InMemoryChannelLayer(), group) is None
    channel_layers.backends.clear()


async def test_concurrent_broadcasts_share_a_round_trip_and_all_arrive_in_order(
    settings, redis_url
):
    from realtime import store

    layer = _layer(settings, PUBSUB, [redis_url])
    hub = broker.Hub(layer)
    recorder = Recorder()
    await hub.subscribe("lobby", recorder)
    pipeline = store.auto_pipeline()
    before = pipeline.flushes
    await asyncio.gather(
        *(broker.publish_message("lobby", seq, f"f{seq}") for seq in range(1, 11)),
        broker.publish_ephemeral("lobby", "typing"),
    )
    assert pipeline.flushes - before == 1
    await wait_for(recorder, 11)
    assert recorder.got[:10] == [("lobby", seq, f"f{seq}") for seq in range(1, 11)]
    assert recorder.got[10] == ("lobby", None, "typing")
    await hub.close()
    await store.async_client().aclose()
    channel_layers.backends.clear()


async def test_shared_reads_run_once_per_key_while_in_flight():
    hub = broker.Hub(RestartingLayer())
    release = asyncio.Event()
    calls = []

    async def read(value):
        calls.append(value)
        await release.wait()
        return value

    first = asyncio.create_task(hub.shared("k", lambda: read(1)))
    second = asyncio.create_task(hub.shared("k", lambda: read(2)))
    other = asyncio.create_task(hub.shared("other", lambda: read(3)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(first, second, other) == [1, 1, 3]
    assert calls == [1, 3]
    # Done reads are not kept: the next caller reads afresh.
    assert await hub.shared("k", lambda: read(4)) == 4
    assert calls == [1, 3, 4]
    await hub.close()


async def test_a_cancelled_caller_does_not_cancel_the_shared_read_for_the_others():
    hub = broker.Hub(RestartingLayer())
    release = asyncio.Event()

    async def read():
        await release.wait()
        return "rows"

    leader = asyncio.create_task(hub.shared("k", read))
    follower = asyncio.create_task(hub.shared("k", read))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    release.set()
    assert await follower == "rows"
    await hub.close()


async def test_a_failed_shared_read_fails_every_caller():
    hub = broker.Hub(RestartingLayer())
    release = asyncio.Event()

    async def read():
        await release.wait()
        raise ConnectionError("database went away")

    callers = [asyncio.create_task(hub.shared("k", read)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    assert not hub._shared  # nothing left behind for the next caller
    await hub.close()
