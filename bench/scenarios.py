"""The four scenarios of issue 8: fan-out, rooms, idle and sends; stacks interleaved per step."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.dbprobe import CommitProbe
from bench.load import (
    REQUEST_TIMEOUT,
    Generator,
    Measure,
    close_all,
    drain,
    members,
    now_us,
    run_schedule,
    settle,
    summarise,
)
from bench.stacks import Stack
from bench.wsclient import Connection


@dataclass
class Config:
    step_seconds: float
    drain_seconds: float
    p99_limit_ms: float
    users: int
    publishers: int
    fanout_sizes: list[int]
    fanout_rates: list[int]
    fixed_rates: list[int]
    rooms_clients: int
    room_size: int
    rooms_rate: float
    rooms_seconds: float
    idle_connections: int
    idle_concurrency: int
    sends_senders: int
    sends_rooms: int


Record = Callable[[dict[str, Any]], None]

# The stacks that carry messages; the others (the floors) only take part in the idle scenario.
TRAFFIC_KINDS = ("realtime", "baseline")


def room_name(base: str, stack: Stack | str) -> str:
    """Each stack gets its own rooms: realtime stacks share the database, and a room's seq
    advanced by another stack would look like a gap (filled from the database) to this one."""
    name = stack if isinstance(stack, str) else stack.name
    if "@" in name:  # <stack>@<git ref>: a ref may hold anything a room slug may not
        name = f"{name.split('@', 1)[0]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return f"bench-{base}-{name}"


class Runner:
    def __init__(
        self,
        gen: Generator,
        stacks: list[Stack],
        cookies: list[str],
        redis_pid: int,
        cfg: Config,
        database_url: str | None = None,
    ) -> None:
        self.gen = gen
        self.database_url = database_url
        self.stacks = stacks
        self.cookies = cookies
        self.redis_pid = redis_pid
        self.cfg = cfg
        # Called as each open-loop step starts (the profiler attaches there).
        self.on_step: Callable[[Stack], None] | None = None

    def traffic(self) -> list[Stack]:
        return [s for s in self.stacks if s.kind in TRAFFIC_KINDS]

    def cookie(self, i: int) -> str:
        return self.cookies[i % len(self.cookies)]

    def row(self, scenario: str, stack: Stack, step: str, **figures: Any) -> dict[str, Any]:
        return {
            "scenario": scenario,
            "stack": stack.name,
            "kind": stack.kind,
            "server": stack.server,
            "step": step,
            "rss_mb": round(stack.rss() / 2**20, 1),
            **figures,
        }

    # -- a measured open-loop step -------------------------------------------------------------

    async def _open_loop(
        self,
        stack: Stack,
        conns: list[Connection],
        events: list[tuple[float, Connection]],
        duration: float,
    ) -> dict[str, Any]:
        gen = self.gen
        stack.assert_alive()
        measure = Measure(stack, self.redis_pid)
        step = gen.begin()
        if self.on_step is not None:
            self.on_step(stack)
        measure.start()
        probe = CommitProbe(self.database_url)
        probe.start()
        send_s = await run_schedule(gen, stack, events, duration)
        size = members(conns)
        expected = sum(step.sent[room] * size[room] for room in step.sent)
        acks = sum(step.sent.values()) if stack.kind == "realtime" else 0
        await drain(gen, expected, acks, self.cfg.drain_seconds)
        counters = measure.stop()
        gen.step = None
        figures = summarise(step, counters, expected, max(send_s, duration))
        figures.update(await probe.stop())
        await settle([stack])
        return figures

    def _passed(self, f: dict[str, Any]) -> bool:
        return (
            f["lost"] == 0
            and f["duplicates"] == 0
            and f["out_of_order"] == 0
            and f["errors"] == 0
            and f["p99_ms"] <= self.cfg.p99_limit_ms
        )

    # -- fan-out ---------------------------------------------------------------------------------

    async def fanout(self, size: int, record: Record) -> dict[str, int]:
        """One room of ``size`` clients; rates climb until a step fails (past the fixed rates)."""
        cfg = self.cfg
        conns: dict[str, list[Connection]] = {}
        try:
            for stack in self.traffic():
                room = room_name(f"fan-{size}", stack)
                specs = [(self.cookie(j), room) for j in range(size)]
                conns[stack.name] = await self.gen.open_many(stack, specs)
            await settle(self.stacks)
            saturation = {s.name: 0 for s in self.traffic()}
            active = self.traffic()
            for rate in cfg.fanout_rates:
                for stack in list(active):
                    clients = conns[stack.name]
                    publishers = clients[: max(1, cfg.publishers)]
                    per_s = rate / size
                    count = max(1, round(per_s * cfg.step_seconds))
                    events = [(i / per_s, publishers[i % len(publishers)]) for i in range(count)]
                    figures = await self._open_loop(stack, clients, events, cfg.step_seconds)
                    passed = self._passed(figures)
                    record(
                        self.row(
                            f"fanout-{size}",
                            stack,
                            f"{rate}/s",
                            offered_per_s=rate,
                            subscribers=size,
                            passed=passed,
                            **figures,
                        )
                    )
                    if passed:
                        saturation[stack.name] = max(saturation[stack.name], rate)
                    elif rate >= max(cfg.fixed_rates, default=0):
                        active.remove(stack)
                if not active:
                    break
            return saturation
        finally:
            for group in conns.values():
                close_all(group)
            await settle(self.stacks)

    # -- rooms -----------------------------------------------------------------------------------

    async def rooms(self, record: Record) -> None:
        """Clients in rooms of ``room_size``, each sending ``rooms_rate`` messages/s."""
        cfg = self.cfg
        n = cfg.rooms_clients
        rng = random.Random(8)
        period = 1.0 / cfg.rooms_rate
        for stack in self.traffic():
            specs = [
                (self.cookie(j), room_name(f"room-{j // cfg.room_size}", stack)) for j in range(n)
            ]
            conns = await self.gen.open_many(stack, specs)
            try:
                await settle(self.stacks)
                events: list[tuple[float, Connection]] = []
                for conn in conns:
                    t = rng.uniform(0, period)
                    while t < cfg.rooms_seconds:
                        events.append((t, conn))
                        t += period
                events.sort(key=lambda e: e[0])
                figures = await self._open_loop(stack, conns, events, cfg.rooms_seconds)
                record(
                    self.row(
                        "rooms",
                        stack,
                        f"{n} in rooms of {cfg.room_size}",
                        offered_per_s=round(n * cfg.rooms_rate * cfg.room_size),
                        passed=self._passed(figures),
                        **figures,
                    )
                )
            finally:
                close_all(conns)
                await settle(self.stacks)

    # -- idle ------------------------------------------------------------------------------------

    async def idle(self, record: Record) -> None:
        """Open many connections (session auth + join): connections/s and RSS per connection."""
        cfg = self.cfg
        n = cfg.idle_connections
        for stack in self.stacks:
            specs = [
                (self.cookie(j), room_name(f"idle-{(j // 30) % 100}", stack)) for j in range(n)
            ]
            stack.assert_alive()
            await settle([stack])
            rss0 = stack.rss()
            measure = Measure(stack, self.redis_pid)
            if self.on_step is not None:
                self.on_step(stack)
            measure.start()
            conns = await self.gen.open_many(stack, specs, cfg.idle_concurrency)
            counters = measure.stop()
            try:
                await settle([stack])
                await asyncio.sleep(1.0)
                rss1 = stack.rss()
                record(
                    self.row(
                        "idle",
                        stack,
                        f"{n} connections",
                        connections=len(conns),
                        connections_per_s=round(len(conns) / counters["wall_s"], 1),
                        server_cpu_us_per_connection=round(
                            counters["server_cpu_s"] * 1e6 / max(1, len(conns)), 1
                        ),
                        generator_cpu_us_per_connection=round(
                            counters["generator_cpu_s"] * 1e6 / max(1, len(conns)), 1
                        ),
                        rss_kb_per_connection=round((rss1 - rss0) / 1024 / max(1, len(conns)), 1),
                        rss_before_mb=round(rss0 / 2**20, 1),
                    )
                )
            finally:
                close_all(conns)
                await settle([stack])

    # -- sends -----------------------------------------------------------------------------------

    async def sends(self, record: Record) -> None:
        """Acked, persisted sends/s: closed-loop senders spread over several rooms."""
        cfg = self.cfg
        n = cfg.sends_senders
        for stack in self.stacks:
            if stack.kind != "realtime":
                continue  # the tutorial has no acks and no persistence
            specs = [
                (self.cookie(j), room_name(f"send-{j % cfg.sends_rooms}", stack)) for j in range(n)
            ]
            conns = await self.gen.open_many(stack, specs)
            try:
                await settle(self.stacks)
                figures = await self._closed_loop(stack, conns, cfg.step_seconds)
                record(
                    self.row(
                        "sends",
                        stack,
                        f"{n} senders, {cfg.sends_rooms} rooms",
                        passed=self._passed(figures),
                        **figures,
                    )
                )
            finally:
                close_all(conns)
                await settle(self.stacks)

    async def _closed_loop(
        self, stack: Stack, conns: list[Connection], duration: float
    ) -> dict[str, Any]:
        gen = self.gen
        measure = Measure(stack, self.redis_pid)
        step = gen.begin()
        if self.on_step is not None:
            self.on_step(stack)
        measure.start()
        probe = CommitProbe(self.database_url)
        probe.start()
        start = time.monotonic()
        end = start + duration

        async def sender(j: int, conn: Connection) -> None:
            room, pub = conn.state["room"], conn.state["pub"]
            m = 0
            while time.monotonic() < end and not conn.closed:
                m += 1
                sent = now_us()
                step.sent[room] += 1
                frame = {
                    "type": "send",
                    "room": room,
                    "ref": f"c{m}",
                    "client_msg_id": f"{step.id}-{j}-{m}",
                    "payload": {"k": f"~B:{step.id}:{pub}:{m}:{sent}~"},
                }
                try:
                    reply = await asyncio.wait_for(conn.request_json(frame), REQUEST_TIMEOUT)
                except (TimeoutError, ConnectionError):
                    step.errors += 1
                    continue
                if reply.get("type") == "ack":
                    step.acks += 1
                    step.ack_latencies.append(now_us() - sent)
                else:
                    step.errors += 1

        await asyncio.gather(*(sender(j, c) for j, c in enumerate(conns)))
        send_s = time.monotonic() - start
        size = members(conns)
        expected = sum(step.sent[room] * size[room] for room in step.sent)
        await drain(gen, expected, 0, self.cfg.drain_seconds)
        counters = measure.stop()
        gen.step = None
        figures = summarise(step, counters, expected, send_s)
        figures.update(await probe.stop())
        figures["acked_sends_per_s"] = round(step.acks / send_s, 1)
        figures["server_cpu_us_per_send"] = round(
            counters["server_cpu_s"] * 1e6 / max(1, step.acks), 1
        )
        await settle([stack])
        return figures
