"""writer.py: sends queued while a batch is stored form the next batch; results go back to
the right sender; failures reach every sender of the batch."""

import asyncio
import threading

import pytest

from realtime import services, writer
from realtime.errors import Forbidden
from realtime.models import Message

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10


def first_batch_held():
    """A store that holds its first batch until ``release`` is set (so that sends queue up
    behind it), and records each batch's size."""
    entered, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def store(items):
        sizes.append(len(items))
        entered.set()
        if len(sizes) == 1:
            assert release.wait(TIMEOUT)
        return services.append_messages(items)

    return store, entered, release, sizes


async def test_concurrent_sends_share_batches_and_get_their_own_results(rooms, users):
    store, entered, release, sizes = first_batch_held()
    batch_writer = writer.BatchWriter(store)
    first = asyncio.ensure_future(
        batch_writer.append(services.Append("lobby", users["alice"], {"n": 0}))
    )
    assert await asyncio.to_thread(entered.wait, TIMEOUT)
    rest = [
        asyncio.ensure_future(
            batch_writer.append(services.Append("lobby", users["bob"], {"n": n}, f"c{n}"))
        )
        for n in range(1, 31)
    ]
    refused = asyncio.ensure_future(
        batch_writer.append(services.Append("team", users["carol"], {"n": -1}))
    )
    await asyncio.sleep(0)  # the new tasks run up to their wait: all are queued now
    assert len(batch_writer._queue) == 31
    release.set()
    async with asyncio.timeout(TIMEOUT):
        results = [await first] + [await task for task in rest]
        with pytest.raises(Forbidden):
            await refused
    assert sizes == [1, 31]  # everything queued behind the first batch went in one
    assert batch_writer.batches == 2
    assert [r.message["seq"] for r in results] == list(range(1, 32))
    assert [r.message["payload"]["n"] for r in results] == list(range(31))
    assert await Message.objects.filter(room__slug="lobby").acount() == 31


async def test_a_database_failure_reaches_every_sender_of_the_batch(rooms, users):
    def store(items):
        raise RuntimeError("connection lost")

    batch_writer = writer.BatchWriter(store)
    tasks = [
        asyncio.ensure_future(batch_writer.append(services.Append("lobby", users["alice"], {})))
        for _ in range(3)
    ]
    async with asyncio.timeout(TIMEOUT):
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes


async def test_a_cancelled_sender_does_not_break_the_writer(rooms, users):
    entered, release = threading.Event(), threading.Event()

    def store(items):
        entered.set()
        assert release.wait(TIMEOUT)
        return services.append_messages(items)

    batch_writer = writer.BatchWriter(store)
    gone = asyncio.ensure_future(batch_writer.append(services.Append("lobby", users["alice"], {})))
    assert await asyncio.to_thread(entered.wait, TIMEOUT)  # its batch is being stored
    gone.cancel()
    release.set()
    async with asyncio.timeout(TIMEOUT):
        later = await batch_writer.append(services.Append("lobby", users["alice"], {"n": 2}))
    assert gone.cancelled()
    # The cancelled send was stored all the same (its client retries with client_msg_id).
    assert later.message["seq"] == 2


async def test_a_busy_writer_waits_for_more_sends_before_the_next_batch(rooms, users, settings):
    # A (alone) is held in the store while B queues: the writer is busy, so before storing B
    # it waits up to REALTIME_SEND_BATCH_WAIT, and C, sent once A is answered, joins B.
    settings.REALTIME_SEND_BATCH_WAIT = TIMEOUT
    store, entered, release, sizes = first_batch_held()
    batch_writer = writer.BatchWriter(store)

    def send(n):
        return asyncio.ensure_future(
            batch_writer.append(services.Append("lobby", users["alice"], {"n": n}))
        )

    a = send(0)
    assert await asyncio.to_thread(entered.wait, TIMEOUT)
    b = send(1)
    await asyncio.sleep(0)  # b runs up to its wait: queued behind A
    release.set()
    async with asyncio.timeout(TIMEOUT):
        await a
        c = send(2)
        # MAX_BATCH sends end the wait early: the test does not wait TIMEOUT seconds.
        rest = [send(n) for n in range(3, writer.MAX_BATCH + 1)]
        results = [await b, await c] + [await task for task in rest]
    assert sizes == [1, writer.MAX_BATCH]
    assert [r.message["seq"] for r in results] == list(range(2, writer.MAX_BATCH + 2))


async def test_a_lone_send_does_not_wait_for_company(rooms, users, settings):
    # An idle writer stores a single send at once, whatever REALTIME_SEND_BATCH_WAIT says.
    settings.REALTIME_SEND_BATCH_WAIT = 3600
    batch_writer = writer.BatchWriter()
    for n in range(3):  # each one alone: the writer is idle again when the next comes
        async with asyncio.timeout(TIMEOUT):
            result = await batch_writer.append(services.Append("lobby", users["alice"], {"n": n}))
        assert result.message["seq"] == n + 1
    assert batch_writer.batches == 3
