"""The database's own commit latency during a step, beside the step's figures.

Every message realtime delivers was committed to PostgreSQL first (its seq is the room's
head in the same transaction), so a delivery waits for the commit's WAL flush. On a shared
or virtual disk that flush sometimes stalls for 100-200 ms (seen here: the same stall, at
the same instant, in both servers' send batches and in an unrelated client's commits), and
every message sent meanwhile is that late: one such stall in a 10 s step is enough to move
its p99. The probe commits a tiny transaction of its own every ``INTERVAL`` seconds on its
own connection (``SELECT txid_current()``: an xid, so a commit record and a WAL flush, and no
table), so the report can tell a database stall from a server one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

INTERVAL = 0.05


class CommitProbe:
    """``start()`` before a step, ``await stop()`` after it: commit latencies in between."""

    def __init__(self, database_url: str | None) -> None:
        # SQLite (a test's tiny run) has no server to stall: nothing to probe.
        self.url = database_url if database_url and database_url.startswith("postgres") else None
        self.latencies_ms: list[float] = []
        self.errors = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        if self.url is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(self.url))

    async def stop(self) -> dict[str, Any]:
        """``db_commit_p99_ms`` and ``db_commit_max_ms`` (None when nothing was probed)."""
        if self._task is not None:
            self._stopping.set()
            try:
                await asyncio.wait_for(self._task, timeout=10.0)
            except TimeoutError:
                self.errors += 1  # wait_for has cancelled the stuck probe
        lat = sorted(self.latencies_ms)
        if not lat:
            return {"db_commit_p99_ms": None, "db_commit_max_ms": None}
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        return {"db_commit_p99_ms": round(p99, 2), "db_commit_max_ms": round(lat[-1], 2)}

    async def _run(self, url: str) -> None:
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=5)
        except psycopg.Error:
            self.errors += 1
            return
        try:
            while not self._stopping.is_set():
                began = time.perf_counter()
                try:
                    await conn.execute("SELECT txid_current()")
                except psycopg.Error:
                    self.errors += 1
                    return
                self.latencies_ms.append((time.perf_counter() - began) * 1000)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), INTERVAL)
        finally:
            await conn.close()
