"""dbthread.on_db_thread: database_sync_to_async made once per function."""

import threading

from realtime.dbthread import on_db_thread


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
