"""Deployment tier: the shipped topology under faults.

Each stack is a private redis-server, a fresh PostgreSQL database, two daphne processes run
with the systemd unit's command line, and nginx running the rendered deploy/nginx templates
(tests/servers.py). Clients behave like realtime.js: they reconnect through nginx after any
close and resume every room with ``after_seq``; senders resend with the same
``client_msg_id`` until acked. The tests that destroy something (crash, Redis restart,
drain) start their own stack; the others share one.

Nothing sleeps to synchronise: waits poll or read under deadlines. The sleeps that remain are
the behaviour under test (the 3 s Redis outage, the 35 s idle period) or the pace of a steady
stream of sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from realtime.drain import DRAIN_TIMEOUT
from tests import servers
from tests.servers import DeployedStack

pytestmark = pytest.mark.integration

Frame = dict[str, Any]
ROOM = "lobby"
RECONNECT_LIMIT = 5.0  # seconds a client of a dead process may take to be back in its room
WAIT = 30.0  # generous deadline for anything that is not the behaviour under test
MAX_CONNECTS = 200  # bounds each client's reconnect loop
SEND_PACE = 0.05  # seconds between two sends of the steady stream
IDLE_SECONDS = 35


def _origin_of(ws_url: str) -> str:
    return "http://" + urlsplit(ws_url).netloc


class Disconnected(Exception):
    """The connection a request was sent on closed before its reply came."""


class Member:
    """A client that stays in ROOM across reconnects and records what it saw."""

    def __init__(self, label: str, first_url: str, stack: DeployedStack, cookie: str, **options):
        self.label = label
        self.first_url = first_url
        self.url = stack.nginx.ws_url  # every reconnect goes through nginx
        self.cookie = cookie
        self.options = options
        self.seqs: list[int] = []
        self.ids: list[int] = []
        self.head0: int | None = None
        self.epoch: int | None = None
        self.closes: list[int] = []
        self.closed_at: float | None = None
        self.rejoin_times: list[float] = []  # seconds from a close to the next join's ack
        self.violations: list[str] = []
        self.errors: list[Frame] = []
        self.ws: ClientConnection | None = None
        self.in_room = asyncio.Event()
        self._waiters: dict[str, asyncio.Future[Frame]] = {}
        self._refs = itertools.count(1)
        self._stopping = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=self.label)

    async def stop(self) -> None:
        self._stopping = True
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            async with asyncio.timeout(WAIT):
                await self.task

    async def _run(self) -> None:
        url = self.first_url
        backoff = 0.05
        for _attempt in range(MAX_CONNECTS):
            if self._stopping:
                return
            try:
                async with connect(
                    url,
                    # The page's origin is the server it talks to (the Origin check matches
                    # scheme, host and port): nginx's, or a daphne's when it is reached directly.
                    additional_headers={"Origin": _origin_of(url), "Cookie": self.cookie},
                    proxy=None,
                    open_timeout=10,
                    close_timeout=5,
                    **self.options,
                ) as ws:
                    self.ws = ws
                    backoff = 0.05
                    await self._session(ws)
                code = ws.close_code if ws.close_code is not None else 1006
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
            except (OSError, InvalidHandshake, TimeoutError):
                code = None  # could not connect (yet): retry with back-off
            self._disconnected(code)
            url = self.url
            if self._stopping:
                return
            await asyncio.sleep(backoff)  # reconnect back-off, as realtime.js does
            backoff = min(backoff * 2, 0.5)
        self.violations.append(f"gave up after {MAX_CONNECTS} connection attempts")

    def _disconnected(self, code: int | None) -> None:
        self.in_room.clear()
        self.ws = None
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(Disconnected())
        self._waiters.clear()
        if code is not None and not self._stopping:
            self.closes.append(code)
            if self.closed_at is None:
                self.closed_at = time.monotonic()

    async def _session(self, ws: ClientConnection) -> None:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello
        join: Frame = {"type": "join", "room": ROOM, "ref": f"join-{next(self._refs)}"}
        resuming = bool(self.seqs) or self.head0 is not None
        if resuming:
            join["after_seq"] = self.seqs[-1] if self.seqs else self.head0
            join["epoch"] = self.epoch
        await ws.send(json.dumps(join))
        async for raw in ws:
            frame = json.loads(raw)
            kind, ref = frame["type"], frame.get("ref")
            if ref == join["ref"]:
                self._joined(frame, resuming)
            elif ref in self._waiters:
                self._waiters.pop(ref).set_result(frame)
            elif kind == "message":
                self._take(frame)
            elif kind == "error":
                self.errors.append(frame)

    def _joined(self, ack: Frame, resuming: bool) -> None:
        if ack["type"] != "ack":
            self.violations.append(f"join refused: {ack}")
            return
        if resuming and not ack["recovered"]:
            self.violations.append(f"resume not recovered: {ack}")
        if self.head0 is None:
            self.head0 = ack["seq"]
        self.epoch = ack["epoch"]
        if self.closed_at is not None:
            self.rejoin_times.append(time.monotonic() - self.closed_at)
            self.closed_at = None
        self.in_room.set()

    def _take(self, message: Frame) -> None:
        expected = (self.seqs[-1] if self.seqs else self.head0 or 0) + 1
        if message["seq"] != expected:
            self.violations.append(f"got seq {message['seq']}, expected {expected}")
        self.seqs.append(message["seq"])
        self.ids.append(message["id"])

    async def request(self, frame: Frame) -> Frame:
        """Send one frame on the current connection; its reply (Disconnected if it closes)."""
        ws = self.ws
        if ws is None or not self.in_room.is_set():
            raise Disconnected()
        ref = f"{self.label}-{next(self._refs)}"
        waiter = self._waiters[ref] = asyncio.get_running_loop().create_future()
        try:
            await ws.send(json.dumps({**frame, "ref": ref}))
        except ConnectionClosed as exc:
            self._waiters.pop(ref, None)
            raise Disconnected() from exc
        async with asyncio.timeout(WAIT):
            return await waiter

    async def wait_in_room(self, within: float = WAIT) -> None:
        async with asyncio.timeout(within):
            await self.in_room.wait()

    async def wait_seq(self, seq: int, within: float = WAIT) -> None:
        """Until this client has received ``seq`` (polling its own record, bounded)."""
        deadline = time.monotonic() + within
        while not (self.seqs and self.seqs[-1] >= seq):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.label}: no seq {seq} within {within} s (last "
                    f"{self.seqs[-1:]}, closes {self.closes}, violations {self.violations})"
                )
            await asyncio.sleep(0.02)


class Sender:
    """Sends numbered messages through a Member until each is acked; records every reply."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.acks: dict[int, Frame] = {}  # n -> ack
        self.unavailable: list[tuple[float, int]] = []  # (when, n)
        self.ack_times: list[float] = []

    async def send(self, n: int, within: float = WAIT) -> Frame:
        frame = {
            "type": "send",
            "room": ROOM,
            "payload": {"n": n, "from": self.member.label},
            "client_msg_id": f"{self.member.label}-{n}",
        }
        deadline = time.monotonic() + within
        for _attempt in range(10_000):
            if time.monotonic() > deadline:
                break
            try:
                await self.member.wait_in_room(max(0.1, deadline - time.monotonic()))
                reply = await self.member.request(frame)
            except (Disconnected, TimeoutError):
                continue
            if reply["type"] == "ack":
                self.acks[n] = reply
                self.ack_times.append(time.monotonic())
                return reply
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            self.unavailable.append((time.monotonic(), n))
            await asyncio.sleep(0.1)  # retry pace while the service is down
        raise AssertionError(f"{self.member.label}: message {n} not acked within {within} s")

    async def stream(self, count: int, start: int = 0) -> None:
        """A steady stream: ``count`` messages, one at a time, SEND_PACE apart."""
        for n in range(start, start + count):
            await self.send(n)
            await asyncio.sleep(SEND_PACE)

    def acked_seqs(self) -> list[int]:
        return sorted(ack["seq"] for ack in self.acks.values())


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """A migrated, seeded PostgreSQL database that every stack copies."""
    with servers.seeded_postgres_template() as name:
        yield name


def _check_logs(stack: DeployedStack, allow_tracebacks: bool) -> None:
    """No application crash in any daphne log (and, unless allowed, no traceback at all)."""
    bad = {}
    for name, text in stack.logs().items():
        crashed = "Exception inside application" in text or "took too long to shut down" in text
        if crashed or (not allow_tracebacks and servers.tracebacks(text)):
            bad[name] = text
    for name, text in bad.items():
        print(f"===== {name} log =====\n{text}")
    assert not bad, f"application errors in the log of {sorted(bad)} (printed above)"


@contextlib.contextmanager
def fresh_stack(tmp_path: Path, template_db: str) -> Iterator[DeployedStack]:
    with servers.deployed_stack(tmp_path / "stack", template_db) as stack:
        yield stack


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory, template_db) -> Iterator[DeployedStack]:
    """One stack for the tests that leave it intact (cross-process, idle)."""
    with servers.deployed_stack(tmp_path_factory.mktemp("shared-stack"), template_db) as stack:
        yield stack
    _check_logs(stack, allow_tracebacks=False)


def cookies_for(stack: DeployedStack) -> dict[str, str]:
    return {name: servers.login(stack.servers[0], name) for name in ("alice", "bob")}


def health(url: str) -> tuple[int, dict[str, Any]]:
    return servers.http_json(f"{url}/healthz", timeout=10)


def connections(server: servers.DaphneServer) -> int:
    status, body = health(server.base_url)
    assert status == 200, body
    return int(body["checks"]["process"]["connections"])


async def start_members(members: list[Member]) -> None:
    for member in members:
        member.start()
    for member in members:
        await member.wait_in_room()


async def stop_members(members: list[Member]) -> None:
    for member in members:
        await member.stop()


async def assert_no_consumer_left(stack: DeployedStack, within: float = 10.0) -> None:
    """Every process lets go of the closed connections promptly: no consumer is stuck."""
    for server in stack.servers:
        if server.process.running():
            await _until(lambda s=server: connections(s) == 0, f"{server.name} idle", within)


def spread(stack: DeployedStack, cookies: dict[str, str], per_route: int) -> list[Member]:
    """``per_route`` clients straight to A, to B, and through nginx each (users alternate)."""
    a, b = stack.servers
    routes = [("A", a.ws_url), ("B", b.ws_url), ("nginx", stack.nginx.ws_url)]
    users = itertools.cycle(["alice", "bob"])
    return [
        Member(f"{route}{i}-{user}", url, stack, cookies[user])
        for route, url in routes
        for i, user in zip(range(per_route), users, strict=False)
    ]


def assert_complete(members: list[Member], first: int, last: int) -> None:
    """Every member got exactly seqs first..last, in order, no duplicate, same ids."""
    reference: list[int] | None = None
    for member in members:
        assert not member.violations, f"{member.label}: {member.violations}"
        got = [s for s in member.seqs if s >= first]
        assert got == list(range(first, last + 1)), f"{member.label}: seqs {got}"
        ids = member.ids[len(member.seqs) - len(got) :]
        assert len(set(ids)) == len(ids), f"{member.label}: duplicate ids"
        reference = reference or ids
        assert ids == reference, f"{member.label}: ids differ from the others"


# -- cross-process and idle (shared stack) -------------------------------------------------


async def test_clients_on_both_processes_and_behind_nginx_get_every_message_in_order(
    shared_stack,
):
    stack = shared_stack
    cookies = cookies_for(stack)
    members = spread(stack, cookies, per_route=3)
    await start_members(members)
    try:
        # Both processes serve clients (nginx spreads its share too).
        assert all(connections(s) >= 3 for s in stack.servers)
        head = max(m.head0 for m in members)
        assert all(m.head0 == head for m in members)
        # Two senders, one on each process, race for the room's next seq.
        on_a, on_b = Sender(members[0]), Sender(members[3])
        await asyncio.gather(on_a.stream(25), on_b.stream(25))
        acked = sorted(on_a.acked_seqs() + on_b.acked_seqs())
        assert acked == list(range(head + 1, head + 51))
        for member in members:
            await member.wait_seq(head + 50)
        assert_complete(members, head + 1, head + 50)
        for member in members:
            assert member.closes == [], f"{member.label} was disconnected: {member.closes}"
    finally:
        await stop_members(members)


async def test_idle_clients_behind_nginx_stay_connected_then_get_a_message(shared_stack):
    stack = shared_stack
    cookies = cookies_for(stack)
    users = itertools.cycle(["alice", "bob"])
    # No client keepalive pings: only daphne's pings cross nginx while idle.
    members = [
        Member(f"idle{i}", stack.nginx.ws_url, stack, cookies[next(users)], ping_interval=None)
        for i in range(10)
    ]
    await start_members(members)
    try:
        offsets = {s.name: s.process.log_size() for s in stack.servers}
        await asyncio.sleep(IDLE_SECONDS)  # the idle period under test
        for member in members:
            assert member.closes == [] and member.ws is not None, member.label
            assert member.ws.state is State.OPEN, member.label
        sender = Sender(members[0])
        ack = await sender.send(0)
        for member in members:
            await member.wait_seq(ack["seq"], within=10)
            assert member.seqs[-1] == ack["seq"] and not member.violations, member.label
        for server in stack.servers:
            log = server.process.log_since(offsets[server.name])
            assert "receive failed" not in log and "TimeoutError" not in log, log
    finally:
        await stop_members(members)


# -- faults (a stack each) -----------------------------------------------------------------


async def test_kill_9_one_process_clients_move_through_nginx_and_miss_nothing(
    tmp_path, template_db
):
    with fresh_stack(tmp_path, template_db) as stack:
        a, b = stack.servers
        cookies = cookies_for(stack)
        members = spread(stack, cookies, per_route=3)
        await start_members(members)
        try:
            on_a_before = connections(a)
            head = members[0].head0
            sender = Sender(members[6])  # behind nginx, on either process
            stream = asyncio.create_task(sender.stream(80))
            await _until(lambda: len(sender.acks) >= 20, "20 acks before the crash")
            assert a.process.kill() == -9
            await stream
            last = head + 80
            assert sender.acked_seqs() == list(range(head + 1, last + 1))
            for member in members:
                await member.wait_seq(last)
            assert_complete(members, head + 1, last)

            moved = [m for m in members if m.closes]
            # Exactly the clients that were on A lost their connection, and came back fast.
            assert len(moved) == on_a_before, [(m.label, m.closes) for m in moved]
            assert {m.label for m in members if m.label.startswith("A")} <= {m.label for m in moved}
            assert not [m for m in members if m.label.startswith("B") and m.closes]
            for member in moved:
                assert member.closes[0] == 1006, (member.label, member.closes)
                assert len(member.rejoin_times) >= 1, member.label
                assert member.rejoin_times[0] < RECONNECT_LIMIT, (member.label, member.rejoin_times)
            worst = max(m.rejoin_times[0] for m in moved)
            print(f"crash: {len(moved)} clients moved, slowest back in {worst:.2f} s")

            # No lasting trace: nginx sends every new client to the live process...
            assert connections(b) == len(members)
            fresh = [
                Member(f"fresh{i}", stack.nginx.ws_url, stack, cookies["bob"]) for i in range(4)
            ]
            await start_members(fresh)
            await stop_members(fresh)
            assert all(not m.closes for m in fresh)
            # ...and Redis holds nothing for the dead process's hub.
            _assert_no_dead_hub_trace(stack)
        finally:
            await stop_members(members)
        await assert_no_consumer_left(stack)
        _check_logs(stack, allow_tracebacks=False)


def _assert_no_dead_hub_trace(stack: DeployedStack) -> None:
    """The pub/sub layer's subscriptions live on connections: the dead one's went with it."""
    client = redis.Redis(port=stack.redis.port, socket_timeout=5)
    try:
        group = f"asgi__group__realtime.room.{ROOM}"
        subscribers = dict(client.pubsub_numsub(group))
        leftovers = list(client.scan_iter("asgi*", count=1000))
    finally:
        client.close()
    # One subscription to the room: the live process's hub; no key holds anything for A.
    assert subscribers == {group.encode(): 1}, subscribers
    assert leftovers == [], leftovers


async def _until(check, what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


async def test_redis_restart_loses_no_acked_message_and_everyone_recovers(tmp_path, template_db):
    with fresh_stack(tmp_path, template_db) as stack:
        a = stack.servers[0]
        cookies = cookies_for(stack)
        members = spread(stack, cookies, per_route=2)
        await start_members(members)
        try:
            head = members[0].head0
            sender = Sender(members[0])  # on A
            other = Sender(members[2])  # on B
            stream = asyncio.gather(sender.stream(60), other.stream(60, start=1000))
            stream_task = asyncio.ensure_future(stream)
            await _until(lambda: len(sender.acks) >= 10, "10 acks before the outage")

            stack.redis.process.terminate()
            down_at = time.monotonic()
            seen_down = await asyncio.to_thread(_poll_health, a.base_url, 503, 2.5)
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))  # the outage
            up_at = time.monotonic()
            await asyncio.to_thread(servers.restart_redis_empty, stack.redis, tmp_path / "redis2")
            seen_up = await asyncio.to_thread(_poll_health, a.base_url, 200, WAIT)
            await stream_task

            # /healthz named the channel layer while Redis was down, and recovered.
            assert seen_down["failing"] == ["channel_layer"], seen_down
            assert seen_down["checks"]["database"]["status"] == "ok", seen_down
            assert seen_up["status"] == "ok", seen_up
            # Sends during the outage were refused, never acked.
            during = [t for t, _n in sender.unavailable + other.unavailable if down_at < t < up_at]
            assert during, "no send was refused while Redis was down"
            fake = [t for t in sender.ack_times + other.ack_times if down_at + 0.5 < t < up_at]
            assert not fake, f"{len(fake)} acks while Redis was down"

            acked = sorted(sender.acked_seqs() + other.acked_seqs())
            last = head + 120
            assert acked == list(range(head + 1, last + 1)), acked
            # Everyone recovers on their own: the last acked message reaches every client
            # (sessions fill gaps from the database once broadcasts flow again).
            tail = Sender(members[1])
            final = await tail.send(0)
            for member in members:
                await member.wait_seq(final["seq"])
            assert_complete(members, head + 1, final["seq"])
            # No consumer is stuck: every connection still answers.
            for member in members:
                pong = await member.request({"type": "ping"})
                assert pong["type"] == "pong", pong
            print(
                f"redis restart: {len(sender.unavailable) + len(other.unavailable)} sends "
                f"refused during the outage, {sum(len(m.closes) for m in members)} reconnects"
            )
        finally:
            await stop_members(members)
        await assert_no_consumer_left(stack)
        _check_logs(stack, allow_tracebacks=True)


def _poll_health(base_url: str, status: int, within: float) -> dict[str, Any]:
    """Poll /healthz until it answers ``status``; that body."""
    deadline = time.monotonic() + within
    bodies = []
    for _attempt in range(1000):
        got, body = health(base_url)
        if got == status:
            return body
        bodies.append((got, body))
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"/healthz never answered {status} within {within} s: {bodies[-3:]}")


async def test_sigterm_drains_clients_to_the_other_process_without_loss(tmp_path, template_db):
    with fresh_stack(tmp_path, template_db) as stack:
        a, b = stack.servers
        cookies = cookies_for(stack)
        members = spread(stack, cookies, per_route=3)
        await start_members(members)
        try:
            on_a_before = connections(a)
            head = members[0].head0
            sender = Sender(members[3])  # on B
            stream = asyncio.create_task(sender.stream(60))
            await _until(lambda: len(sender.acks) >= 15, "15 acks before the drain")
            started = time.monotonic()
            code = await asyncio.to_thread(a.process.terminate, DRAIN_TIMEOUT + 10)
            drained_in = time.monotonic() - started
            assert code == 0, a.process.log()
            await stream
            last = head + 60
            for member in members:
                await member.wait_seq(last)
            assert_complete(members, head + 1, last)

            moved = [m for m in members if m.closes]
            assert len(moved) == on_a_before
            for member in moved:
                assert member.closes == [1012], (member.label, member.closes)
                assert member.rejoin_times[0] < RECONNECT_LIMIT, member.rejoin_times
            assert connections(b) == len(members)
            log = a.process.log()
            assert f"draining {on_a_before} connection(s) with close code 1012" in log, log
            assert "still open after" not in log, log
            worst = max(m.rejoin_times[0] for m in moved)
            print(f"drain: {len(moved)} clients in {drained_in:.2f} s, slowest back {worst:.2f} s")
        finally:
            await stop_members(members)
        await assert_no_consumer_left(stack)
        _check_logs(stack, allow_tracebacks=False)


async def test_healthz_through_nginx_and_on_each_process(shared_stack):
    for url in [shared_stack.nginx.base_url, *(s.base_url for s in shared_stack.servers)]:
        status, body = health(url)
        assert status == 200, body
        assert body["failing"] == [] and set(body["checks"]) == {
            "database",
            "channel_layer",
            "process",
        }


async def test_nginx_keeps_the_origin_check(shared_stack):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            shared_stack.nginx.ws_url,
            additional_headers={"Origin": "http://evil.example"},
            proxy=None,
            open_timeout=10,
        ):
            pass
    assert refused.value.response.status_code == 403
