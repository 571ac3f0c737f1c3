"""dbthread: database_sync_to_async made once per function, and Batched calls."""

import asyncio
import threading

import pytest

from realtime import dbthread
from realtime.dbthread import Batched, on_db_thread

# database_sync_to_async checks the database thread's connections (close_old_connections)
# around every call: one an earlier test left open there is a database access.
pytestmark = pytest.mark.django_db


def where(value):
    return value, threading.current_thread().name


def elsewhere(value):
    return -value, threading.current_thread().name


async def test_the_wrapper_is_made_once_and_runs_off_the_event_loop():
    assert on_db_thread(where) is on_db_thread(where)
    assert on_db_thread(where) is not on_db_thread(elsewhere)
    value, thread = await on_db_thread(where)(7)
    assert value == 7
    assert thread != threading.current_thread().name
    assert (await on_db_thread(elsewhere)(7))[0] == -7


async def test_a_function_looked_up_at_call_time_can_be_replaced(monkeypatch):
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "where", elsewhere)
    assert (await on_db_thread(module.where)(3))[0] == -3


# -- Batched ---------------------------------------------------------------------------------

batches = []


def doubled(items):
    batches.append((list(items), threading.current_thread().name))
    return [ValueError(f"bad {i}") if i < 0 else i * 2 for i in items]


@pytest.fixture
def batched():
    batches.clear()
    return Batched(lambda items: doubled(items))


async def test_calls_waiting_together_share_one_batch_off_the_loop(batched):
    results = await asyncio.gather(*(batched(i) for i in range(5)))
    assert results == [0, 2, 4, 6, 8]
    assert [items for items, _ in batches] == [[0, 1, 2, 3, 4]]
    assert batches[0][1] != threading.current_thread().name
    assert await batched(7) == 14  # alone: a batch of its own, at once
    assert [items for items, _ in batches][-1] == [7]


async def test_calls_during_a_batch_go_in_the_next_and_big_bursts_are_split(batched, monkeypatch):
    monkeypatch.setattr(dbthread, "MAX_BATCH", 3)
    first = asyncio.ensure_future(batched(1))
    await asyncio.sleep(0)  # the first batch has started: [1]
    rest = [asyncio.ensure_future(batched(i)) for i in range(2, 9)]
    assert await asyncio.gather(first, *rest) == [i * 2 for i in range(1, 9)]
    assert [items for items, _ in batches] == [[1], [2, 3, 4], [5, 6, 7], [8]]


async def test_an_item_error_fails_its_caller_only(batched):
    results = await asyncio.gather(batched(1), batched(-1), batched(2), return_exceptions=True)
    assert results[0] == 2 and results[2] == 4
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -1"


async def test_a_batch_error_fails_every_caller_and_the_next_batch_runs():
    def broken(items):
        raise ConnectionError("the database is down")

    fails = Batched(lambda items: broken(items))
    results = await asyncio.gather(fails(1), fails(2), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    batches.clear()
    works = Batched(lambda items: doubled(items))
    assert await works(3) == 6


async def test_a_cancelled_caller_does_not_disturb_the_others(batched):
    gone = asyncio.ensure_future(batched(1))
    stays = asyncio.ensure_future(batched(2))
    await asyncio.sleep(0)
    gone.cancel()
    assert await stays == 4
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_batch_runs_in_a_context_of_its_own_not_its_first_callers():
    import contextvars

    var = contextvars.ContextVar("request", default=None)
    seen = []

    def record(items):
        seen.append(var.get())
        return items

    recording = Batched(lambda items: record(items))
    var.set("first caller's request")
    assert await recording(1) == 1
    assert seen == [None]


async def test_a_batch_answering_the_wrong_count_fails_every_caller():
    short = Batched(lambda items: items[:-1])
    results = await asyncio.gather(short(1), short(2), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]


def test_a_closed_loops_queue_is_freed():
    import gc
    import weakref

    batched = Batched(lambda items: items)

    async def call():
        return await batched(5)

    def run_in_a_new_loop():
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(call()) == 5
        finally:
            loop.close()
        return weakref.ref(loop)

    first = run_in_a_new_loop()
    # asgiref's worker thread remembers the last loop it served: serve another one.
    second = run_in_a_new_loop()
    gc.collect()
    assert first() is None  # nothing of ours kept it
    assert list(batched._loops.keys()) == [second()]
