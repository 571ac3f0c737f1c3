"""The load generator: clients, the marker carried in every payload, and one measured step.

Every benchmark message carries ``~B:<step>:<publisher>:<n>:<sent µs>~`` in its payload (a
realtime ``send`` payload field, or the tutorial's ``message`` string). Receivers find it with
one ``bytes.find``, so a delivery costs the generator a few microseconds: it records the
latency (CLOCK_MONOTONIC is system-wide, and publishers and receivers share this process),
duplicates (the same publisher and n twice on one connection) and out-of-order arrivals (a
lower n after a higher one from the same publisher). Lost = expected deliveries (messages
sent into a room x connections in it) minus distinct deliveries by the end of the drain.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import wsclient
from bench.stacks import Stack, cpu_seconds
from bench.wsclient import Connection

HOST = "127.0.0.1"
MARK = b"~B:"
REQUEST_TIMEOUT = 30.0
CONNECT_ATTEMPTS = 3


def now_us() -> int:
    return time.monotonic_ns() // 1000


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


@dataclass
class Step:
    """What one measured step saw."""

    id: int
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    errors: int = 0
    acks: int = 0
    late: int = 0
    latencies: list[int] = field(default_factory=list)
    ack_latencies: list[int] = field(default_factory=list)
    sent: Counter[str] = field(default_factory=Counter)


class Generator:
    """Every client connection of the run, in one event loop."""

    def __init__(self) -> None:
        self.step: Step | None = None
        self.steps: dict[int, Step] = {}
        self._step_ids = 0
        self.publisher_ids = 0
        self.unexpected: Counter[str] = Counter()
        self.failed_connects: Counter[str] = Counter()

    # -- receiving ---------------------------------------------------------------------------

    def on_text(self, conn: Connection, payload: bytes) -> None:
        i = payload.find(MARK)
        if i < 0:
            self._on_other(conn, payload)
            return
        now = now_us()
        j = payload.find(b"~", i + 3)
        step_id, pub, n, sent = (int(x) for x in payload[i + 3 : j].split(b":"))
        step = self.step
        if step is None or step.id != step_id:
            # After its step's drain: counted as late for that step, not as a delivery.
            old = self.steps.get(step_id)
            if old is not None:
                old.late += 1
            return
        state = conn.state
        if state.get("step") != step_id:
            state["step"] = step_id
            state["seen"] = set()
            state["last"] = {}
        seen: set[int] = state["seen"]
        key = pub * 100_000_000 + n
        if key in seen:
            step.duplicates += 1
            return
        seen.add(key)
        last: dict[int, int] = state["last"]
        if n < last.get(pub, -1):
            step.out_of_order += 1
        else:
            last[pub] = n
        step.received += 1
        step.latencies.append(now - sent)

    def _on_other(self, conn: Connection, payload: bytes) -> None:
        frame = json.loads(payload)
        kind = frame.get("type")
        ref = frame.get("ref")
        step = self.step
        if isinstance(ref, str) and ref.startswith("s") and kind in ("ack", "error"):
            # An open-loop send's reply: ref = "s<sent µs>".
            if step is not None:
                if kind == "ack":
                    step.acks += 1
                    step.ack_latencies.append(now_us() - int(ref[1:]))
                else:
                    step.errors += 1
                    self.unexpected[f"error:{frame.get('code')}"] += 1
            return
        if conn.resolve(frame):
            return
        if kind == "error":
            self.unexpected[f"error:{frame.get('code')}"] += 1
            if step is not None:
                step.errors += 1

    # -- connecting --------------------------------------------------------------------------

    async def open(self, stack: Stack, index: int, cookie: str, room: str) -> Connection:
        """A client of ``stack`` on its server ``index % n``, joined to ``room``."""
        server = stack.servers[index % len(stack.servers)]
        path = f"/ws/chat/{room}/" if stack.kind == "baseline" else "/ws/"
        conn = await wsclient.connect(HOST, server.port, path, cookie, self.on_text)
        conn.state["room"] = room
        conn.state["pub"] = self._next_publisher()
        if stack.kind == "realtime":
            try:
                reply = await asyncio.wait_for(
                    conn.request_json({"type": "join", "room": room, "ref": "j"}),
                    REQUEST_TIMEOUT,
                )
            except BaseException:
                conn.close()
                raise
            if reply.get("type") != "ack":
                conn.close()
                raise RuntimeError(f"join {room} on {stack.name} refused: {reply}")
        return conn

    def _next_publisher(self) -> int:
        self.publisher_ids += 1
        return self.publisher_ids

    async def open_many(
        self, stack: Stack, specs: list[tuple[str, str]], concurrency: int = 50
    ) -> list[Connection]:
        """Open one client per (cookie, room), ``concurrency`` handshakes in flight.

        A refused or reset handshake (a full listen backlog) is retried, at most
        ``CONNECT_ATTEMPTS`` times; clients that never connect are counted in
        ``self.failed_connects`` and left out.
        """
        gate = asyncio.Semaphore(concurrency)
        conns: list[Connection | None] = [None] * len(specs)

        async def one(i: int, cookie: str, room: str) -> None:
            last: BaseException | None = None
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        conns[i] = await self.open(stack, i, cookie, room)
                        return
                    except (OSError, TimeoutError, RuntimeError) as exc:
                        last = exc
                        await asyncio.sleep(0.2 * (attempt + 1))
                self.failed_connects[f"{stack.name}: {type(last).__name__}"] += 1

        await asyncio.gather(*(one(i, c, r) for i, (c, r) in enumerate(specs)))
        return [c for c in conns if c is not None]

    # -- sending -----------------------------------------------------------------------------

    def send(self, stack: Stack, conn: Connection, n: int) -> None:
        """One benchmark message from ``conn`` into its room (open loop, no await)."""
        assert self.step is not None
        sent = now_us()
        marker = f"~B:{self.step.id}:{conn.state['pub']}:{n}:{sent}~"
        room = conn.state["room"]
        self.step.sent[room] += 1
        if stack.kind == "realtime":
            conn.send_text(
                f'{{"type":"send","room":"{room}","ref":"s{sent}","payload":{{"k":"{marker}"}}}}'
            )
        else:
            conn.send_text(f'{{"message":"{marker}"}}')

    def begin(self) -> Step:
        self._step_ids += 1
        self.step = self.steps[self._step_ids] = Step(self._step_ids)
        return self.step


def close_all(conns: Iterable[Connection]) -> None:
    for conn in conns:
        conn.close()


def members(conns: Iterable[Connection]) -> Counter[str]:
    return Counter(c.state["room"] for c in conns)


@dataclass
class Measure:
    """CPU and memory counters around a step."""

    stack: Stack
    redis_pid: int
    t0: float = 0.0
    cpu0: float = 0.0
    redis0: float = 0.0
    gen0: float = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = self.stack.cpu()
        self.redis0 = cpu_seconds(self.redis_pid)
        self.gen0 = own_cpu()

    def stop(self) -> dict[str, float]:
        return {
            "wall_s": time.monotonic() - self.t0,
            "server_cpu_s": self.stack.cpu() - self.cpu0,
            "redis_cpu_s": cpu_seconds(self.redis_pid) - self.redis0,
            "generator_cpu_s": own_cpu() - self.gen0,
        }


async def run_schedule(
    gen: Generator, stack: Stack, events: list[tuple[float, Connection]], duration: float
) -> float:
    """Send each event at its offset (seconds from now); bounded by ``duration`` + 5 s."""
    start = time.monotonic()
    deadline = start + duration + 5.0
    k = 0
    total = len(events)
    counters: Counter[int] = Counter()
    while k < total and time.monotonic() < deadline:
        elapsed = time.monotonic() - start
        while k < total and events[k][0] <= elapsed:
            conn = events[k][1]
            pub = conn.state["pub"]
            counters[pub] += 1
            gen.send(stack, conn, counters[pub])
            k += 1
        if k < total:
            await asyncio.sleep(max(0.0, events[k][0] - (time.monotonic() - start)))
    return time.monotonic() - start


async def drain(gen: Generator, expected: int, acks_expected: int, within: float) -> None:
    """Wait until every expected delivery (and ack) arrived, or ``within`` seconds."""
    step = gen.step
    assert step is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if step.received >= expected and step.acks + step.errors >= acks_expected:
            return
        await asyncio.sleep(0.02)


async def settle(stacks: list[Stack], threshold: float = 0.1, cap: float = 10.0) -> None:
    """Wait (at most ``cap`` s) until the stacks' servers use under ``threshold`` core."""
    deadline = time.monotonic() + cap
    before = sum(s.cpu() for s in stacks)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = sum(s.cpu() for s in stacks)
        if (now - before) / 0.3 < threshold:
            return
        before = now


def summarise(
    step: Step, counters: dict[str, float], expected: int, send_s: float
) -> dict[str, Any]:
    """The reported figures of one step."""
    lat = sorted(step.latencies)
    ack = sorted(step.ack_latencies)
    received = step.received
    per = 1e6 / received if received else 0.0
    return {
        "deliveries": received,
        "expected": expected,
        "deliveries_per_s": round(received / send_s, 1) if send_s else 0.0,
        "messages_sent": sum(step.sent.values()),
        "server_cpu_us_per_delivery": round(counters["server_cpu_s"] * per, 2),
        "redis_cpu_us_per_delivery": round(counters["redis_cpu_s"] * per, 2),
        "generator_cpu_us_per_delivery": round(counters["generator_cpu_s"] * per, 2),
        "server_cores": round(counters["server_cpu_s"] / counters["wall_s"], 3),
        "generator_cores": round(counters["generator_cpu_s"] / counters["wall_s"], 3),
        "p50_ms": round(percentile(lat, 0.50) / 1000, 2),
        "p99_ms": round(percentile(lat, 0.99) / 1000, 2),
        "max_ms": round((lat[-1] if lat else 0) / 1000, 2),
        "lost": max(0, expected - received),
        "duplicates": step.duplicates,
        "out_of_order": step.out_of_order,
        "errors": step.errors,
        "acks": step.acks,
        "ack_p50_ms": round(percentile(ack, 0.50) / 1000, 2),
        "ack_p99_ms": round(percentile(ack, 0.99) / 1000, 2),
        "step_id": step.id,
    }
