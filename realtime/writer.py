"""Group commit: one thread per process persists client sends in batches.

A send needs a transaction (lock the room, authorise, check the client_msg_id, insert, move
the head). Run one transaction per send on Django's single database thread and a process
stalls at a few hundred sends per second, however many clients wait. Here every send is
queued to one writer thread, which takes everything queued so far and stores it in one
transaction through ``services.append_messages``: a constant number of statements per batch,
so the batch grows with the load and the cost per send falls. Alone, a send is a batch of one
and waits for nothing. When sends queued up while the last batch was stored (the writer is
busy), it waits up to ``REALTIME_SEND_BATCH_WAIT`` seconds for more before the next one, so
batches grow faster than the load (PostgreSQL's ``commit_delay`` idea).

The writer thread keeps its own database connection and treats it as Django treats a
request's: ``close_old_connections()`` before and after each batch, so ``CONN_MAX_AGE`` and
``CONN_HEALTH_CHECKS`` apply as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from django.db import close_old_connections

from realtime import services
from realtime.conf import conf

logger = logging.getLogger(__name__)

# Most sends one transaction takes; the rest wait for the next one.
MAX_BATCH = 200

Result = services.AppendResult | BaseException
Item = tuple[services.Append, asyncio.AbstractEventLoop, "asyncio.Future[services.AppendResult]"]


class BatchWriter:
    """A queue of sends and the thread that stores them (see the module docstring)."""

    def __init__(
        self,
        store: Callable[[list[services.Append]], list[Any]] = services.append_messages,
    ) -> None:
        self._store = store
        self._queue: list[Item] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.batches = 0  # transactions run (for tests and the bench)

    async def append(self, item: services.Append) -> services.AppendResult:
        """Persist ``item`` (in the next batch); its result, or the RealtimeError refusing it.

        Any other exception is the database failing: the whole batch was rolled back."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[services.AppendResult] = loop.create_future()
        with self._wake:
            self._queue.append((item, loop, future))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="realtime-writer", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return await future

    def _run(self) -> None:
        busy = False  # sends queued up while the last batch was being stored
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                wait = float(conf.REALTIME_SEND_BATCH_WAIT) if busy else 0.0
                if wait > 0:
                    # Under load, let the batch grow for a moment: a transaction's fixed
                    # cost (about 1 ms of PostgreSQL CPU here) is shared by more sends.
                    self._wake.wait_for(lambda: len(self._queue) >= MAX_BATCH, timeout=wait)
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            results: list[Result]
            try:
                close_old_connections()
                results = list(self._store([item for item, _, _ in batch]))
            except Exception as exc:
                logger.warning("realtime: storing %d send(s) failed", len(batch), exc_info=True)
                results = [exc] * len(batch)
            finally:
                close_old_connections()
            self.batches += 1
            with self._wake:
                busy = bool(self._queue)
            # One wake-up per event loop, not per send: each call_soon_threadsafe writes to
            # the loop's self-pipe (a system call on both sides).
            answers: dict[asyncio.AbstractEventLoop, list[tuple[Any, Result]]] = {}
            for (_, loop, future), result in zip(batch, results, strict=True):
                answers.setdefault(loop, []).append((future, result))
            for loop, settled in answers.items():
                # RuntimeError: that event loop is closed, nobody waits for the answer.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[services.AppendResult], Result]]) -> None:
    for future, result in settled:
        if future.done():  # the sender was cancelled (its connection closed)
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


_writer = BatchWriter()


async def append(
    slug: str, user: Any, payload: dict[str, Any], client_msg_id: str | None = None
) -> services.AppendResult:
    """Persist one send through the process's writer (see ``services.append_message``)."""
    return await _writer.append(services.Append(slug, user, payload, client_msg_id))
