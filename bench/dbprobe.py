"""The database's own commit latency during a step, beside the step's figures.

Every message realtime delivers was committed to PostgreSQL first (its seq is the room's
head in the same transaction), so a delivery waits for the commit's WAL flush. On a shared
or virtual disk that flush sometimes stalls for 100-200 ms (seen here: the same stall, at
the same instant, in both servers' send batches and in an unrelated client's commits), and
every message sent meanwhile is that late: one such stall in a 10 s step is enough to move
its p99. The probe commits a tiny transaction of its own every ``INTERVAL`` seconds on its
own connection (``SELECT txid_current()``: an xid, so a commit record and a WAL flush, and no
table), so the report can tell a database stall from a server one.

It runs in a thread of its own with a blocking connection, not on the generator's event loop,
whose own delays would otherwise count as the database's (at most a GIL switch interval,
5 ms, can still be added to one sample).
"""

from __future__ import annotations

import asyncio
import threading
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
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        if self.url is not None:
            self._thread = threading.Thread(
                target=self._run, args=(self.url,), name="commit-probe", daemon=True
            )
            self._thread.start()

    async def stop(self) -> dict[str, Any]:
        """``db_commit_p99_ms`` and ``db_commit_max_ms`` (None when nothing was probed)."""
        if self._thread is not None:
            self._stopping.set()
            await asyncio.to_thread(self._thread.join, 10.0)
            if self._thread.is_alive():
                self.errors += 1  # a commit stuck for 10 s: left to its daemon thread
        lat = sorted(self.latencies_ms)
        if not lat:
            return {"db_commit_p99_ms": None, "db_commit_max_ms": None}
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        return {"db_commit_p99_ms": round(p99, 2), "db_commit_max_ms": round(lat[-1], 2)}

    def _run(self, url: str) -> None:
        import psycopg

        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
        except psycopg.Error:
            self.errors += 1
            return
        try:
            while not self._stopping.is_set():
                began = time.perf_counter()
                try:
                    conn.execute("SELECT txid_current()")
                except psycopg.Error:
                    self.errors += 1
                    return
                self.latencies_ms.append((time.perf_counter() - began) * 1000)
                self._stopping.wait(INTERVAL)
        finally:
            conn.close()
