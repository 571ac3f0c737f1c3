"""Synchronous database code called from async code: one ``database_sync_to_async`` per
function, and ``Batched`` calls that share one thread hop.

``database_sync_to_async(fn)`` builds a ``SyncToAsync`` object on every call (it inspects
``fn`` each time); the hot paths (session auth, join, gap fill) call the same few functions
once or twice per connection. ``on_db_thread(fn)`` returns the one wrapper made for ``fn``, so
only the call itself is paid. The function is looked up by the caller at call time, so a
replaced module attribute (a test's monkeypatch) gets a wrapper of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar

from channels.db import database_sync_to_async

P = ParamSpec("P")
R = TypeVar("R")

_wrappers: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def on_db_thread(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """``database_sync_to_async(fn)``, made once per function (plain functions only)."""
    wrapper = _wrappers.get(fn)
    if wrapper is None:
        wrapper = _wrappers[fn] = database_sync_to_async(fn)
    return wrapper  # type: ignore[no-any-return]


A = TypeVar("A")

# The most items one batch takes: bounds its queries' IN lists (SQLite allows 250,000
# parameters by default, Oracle 1,000 items in an IN list) and how long it holds the thread.
MAX_BATCH = 100


class Batched(Generic[A, R]):
    """Calls that wait at the same time share one trip to the database thread.

    ``run(items)`` (synchronous, on the database thread) answers a list of items in order,
    each with its result or the exception of that item alone; an exception it raises fails
    every caller of the batch. Per event loop, the first call of a quiet loop starts a batch
    in the next loop turn; calls that come meanwhile, or while a batch is on the thread, go in
    the next one. Alone, a call costs what ``on_db_thread`` costs; under a burst (a reconnect
    storm) the thread hop and the batch's queries are paid once per batch.

    ``run`` is looked up again for every batch, so a test may replace it through a module
    attribute when ``run`` is a lambda that names it.
    """

    def __init__(self, run: Callable[[list[A]], list[R | Exception]]) -> None:
        self.run = run
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue[A, R]] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, item: A) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        queue = self._loops.get(loop)
        if queue is None:
            queue = self._loops[loop] = _Queue(self.run)
        return queue.add(loop, item)


class _Queue(Generic[A, R]):
    # No reference to its loop: the loop is the key of a weak dictionary holding this.
    def __init__(self, run: Callable[[list[A]], list[R | Exception]]) -> None:
        self.run = run
        self.pending: list[tuple[A, asyncio.Future[R]]] = []
        self.task: asyncio.Task[None] | None = None

    def add(self, loop: asyncio.AbstractEventLoop, item: A) -> asyncio.Future[R]:
        waiter: asyncio.Future[R] = loop.create_future()
        self.pending.append((item, waiter))
        if self.task is None:
            # A context of its own: not the first caller's (a request's asgiref thread
            # context, say), which the batches of other callers must not run in.
            self.task = loop.create_task(self._drain(), context=contextvars.Context())
        return waiter

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                try:
                    results = await on_db_thread(self.run)([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(
                            f"{self.run!r} answered {len(results)} of {len(batch)} items"
                        )
                except Exception as exc:  # the batch's shared work failed: every caller fails
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                except BaseException:
                    for _, waiter in batch:
                        waiter.cancel()
                    raise
                for (_, waiter), result in zip(batch, results, strict=True):
                    if waiter.done():
                        continue  # its caller was cancelled (a client that went away)
                    if isinstance(result, Exception):
                        waiter.set_exception(result)
                    else:
                        waiter.set_result(result)
        finally:
            self.task = None
            pending, self.pending = self.pending, []
            for _, waiter in pending:  # cancelled (the loop is closing)
                waiter.cancel()
