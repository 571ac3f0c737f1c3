"""Integration tier: two real daphne processes sharing a private redis-server and SQLite file.

Clients log in over HTTP as the demo users and speak protocol v1 (DESIGN.md section 3) over
real WebSockets, so these tests cross every process boundary that production has: the
session cookie, the Origin check, the Redis channel layer between processes, and the database
as the source of the sequence.

Nothing here sleeps to synchronise: every wait reads frames until a predicate holds, under a
deadline. The one ``asyncio.sleep`` is the idle period that the keepalive test is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

from tests.servers import DaphneServer, RealtimeStack, login, realtime_stack, tracebacks

pytestmark = pytest.mark.integration

Frame = dict[str, Any]
Predicate = Callable[[Frame], bool]

FRAME_TIMEOUT = 15.0  # seconds a test waits for any expected frame
MAX_FRAMES = 2_000  # frames one wait may read before giving up (bounds every loop)
# Past redis-py's socket timeout (10 s, realtime/layers.py) and channels-redis's 5 s blocking
# receive, and past daphne's 20 s WebSocket keepalive ping.
IDLE_SECONDS = 35


# -- fixtures ------------------------------------------------------------------------------


def _report_tracebacks(logs: dict[str, str]) -> None:
    bad = {name: text for name, text in logs.items() if tracebacks(text)}
    if bad:
        for name, text in bad.items():
            print(f"===== {name} log =====\n{text}")
        pytest.fail(f"Traceback in the log of {', '.join(sorted(bad))} (printed above)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealtimeStack]:
    """Private redis-server, fresh seeded SQLite file, daphne A and daphne B."""
    workdir: Path = tmp_path_factory.mktemp("realtime-integration")
    with realtime_stack(workdir, daphnes=2) as running:
        yield running
    # Every process is stopped here, on failures too; their whole logs must be clean.
    _report_tracebacks({s.name: s.process.log() for s in running.servers})


@pytest.fixture
def servers(stack: RealtimeStack) -> Iterator[tuple[DaphneServer, DaphneServer]]:
    """(A, B) for one test; fails the test that made a server log a traceback."""
    for process in stack.processes():
        process.assert_alive()
    offsets = {s.name: s.process.log_size() for s in stack.servers}
    a, b = stack.servers
    yield a, b
    for process in stack.processes():
        process.assert_alive()
    _report_tracebacks({s.name: s.process.log_since(offsets[s.name]) for s in stack.servers})


@pytest.fixture(scope="module")
def cookies(stack: RealtimeStack) -> dict[str, str]:
    """``Cookie`` header per demo user, each logged in through a different server's form."""
    names = ("alice", "bob", "carol")
    return {
        name: login(stack.servers[i % len(stack.servers)], name) for i, name in enumerate(names)
    }


# -- a protocol v1 client ------------------------------------------------------------------


class Client:
    """One WebSocket connection; keeps every frame it received, in order, in ``frames``."""

    def __init__(self, ws: ClientConnection, label: str) -> None:
        self.ws = ws
        self.label = label
        self.frames: list[Frame] = []
        self._refs = itertools.count(1)

    async def _recv(self) -> Frame:
        data = await self.ws.recv()
        assert isinstance(data, str), f"{self.label}: got a binary frame {data!r:.200}"
        frame = json.loads(data)
        assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
        self.frames.append(frame)
        return frame

    async def wait_for(
        self,
        predicate: Predicate,
        count: int = 1,
        within: float = FRAME_TIMEOUT,
        what: str = "frame",
    ) -> list[Frame]:
        """Read until ``count`` frames received so far match ``predicate``; returns them.

        An ``error`` frame that does not match fails at once rather than at the deadline.
        """
        matched = [f for f in self.frames if predicate(f)]
        try:
            async with asyncio.timeout(within):
                for _ in range(MAX_FRAMES):
                    if len(matched) >= count:
                        return matched
                    frame = await self._recv()
                    if predicate(frame):
                        matched.append(frame)
                    elif frame["type"] == "error":
                        raise AssertionError(f"{self.label}: unexpected error frame {frame}")
        except TimeoutError:
            pass
        raise AssertionError(
            f"{self.label}: {len(matched)}/{count} x {what} within {within} s; "
            f"last frames: {self.frames[-10:]}"
        )

    async def send_frame(self, frame: Frame) -> str:
        """Send one frame with a fresh ``ref``; returns the ref."""
        ref = f"{self.label}-{next(self._refs)}"
        await self.ws.send(json.dumps({**frame, "ref": ref}))
        return ref

    async def replies(self, refs: list[str]) -> list[Frame]:
        """The ack, pong or error frames answering ``refs``, in the order of ``refs``."""
        wanted = set(refs)
        found = await self.wait_for(
            lambda f: f.get("ref") in wanted and f["type"] in {"ack", "pong", "error"},
            count=len(refs),
            what=f"reply to {refs[0]}..{refs[-1]}",
        )
        by_ref = {f["ref"]: f for f in found}
        assert len(by_ref) == len(found), f"{self.label}: a ref was answered twice: {found}"
        return [by_ref[ref] for ref in refs]

    async def request(self, frame: Frame) -> Frame:
        return (await self.replies([await self.send_frame(frame)]))[0]

    async def join(self, room: str, **extra: Any) -> Frame:
        """Join ``room``; asserts ack then presence_state, and returns the ack."""
        ack = await self.request({"type": "join", "room": room, **extra})
        assert ack["type"] == "ack", f"{self.label}: join {room} refused: {ack}"
        assert ack["room"] == room and isinstance(ack["seq"], int), ack
        index = next(i for i, f in enumerate(self.frames) if f is ack)
        await self.wait_for(
            lambda f: f["type"] == "presence_state" and f.get("room") == room,
            what=f"presence_state of {room}",
        )
        assert self.frames[index + 1]["type"] == "presence_state", self.frames[index:]
        return ack

    async def post(self, room: str, payload: dict[str, Any]) -> str:
        """Send one message without waiting for its ack; returns the ref."""
        return await self.send_frame({"type": "send", "room": room, "payload": payload})

    async def wait_seq(self, room: str, seq: int, within: float = FRAME_TIMEOUT) -> None:
        """Read until the ``message`` with ``seq`` (or a later one) of ``room`` arrived."""
        await self.wait_for(
            lambda f: f["type"] == "message" and f.get("room") == room and f["seq"] >= seq,
            within=within,
            what=f"message {room}#{seq}",
        )

    async def settle(self) -> None:
        """A ping round trip: frames the server emitted before the pong are now in ``frames``."""
        pong = await self.request({"type": "ping"})
        assert pong["type"] == "pong", pong

    def messages(self, room: str) -> list[Frame]:
        return [f for f in self.frames if f["type"] == "message" and f.get("room") == room]


@contextlib.asynccontextmanager
async def connected(
    server: DaphneServer,
    cookie: str | None,
    label: str,
    user: str | None = None,
    **options: Any,
) -> AsyncIterator[Client]:
    """A WebSocket to ``server`` with the session ``cookie``; checks ``hello`` comes first."""
    async with server.websocket(cookie, **options) as ws:
        client = Client(ws, label)
        hello = (await client.wait_for(lambda f: f["type"] == "hello", what="hello"))[0]
        assert client.frames[0] is hello, client.frames
        assert hello["protocol"] == 1, hello
        if user is None:
            assert hello["user"] is None, hello
        else:
            assert hello["user"] is not None and hello["user"]["name"] == user, hello
        yield client


def assert_timeline(messages: list[Frame], first: int, last: int, label: str) -> None:
    """``messages`` are exactly seqs first..last, ascending, no duplicates, well formed."""
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(first, last + 1)), f"{label}: seqs {seqs}"
    ids = [m["id"] for m in messages]
    assert len(set(ids)) == len(ids), f"{label}: duplicate ids {ids}"
    for m in messages:
        assert isinstance(m["payload"], dict) and m["sent_at"].endswith("Z"), m


# -- the tests -----------------------------------------------------------------------------


async def test_hello_names_the_logged_in_user_on_both_processes(servers, cookies):
    a, b = servers
    async with (
        connected(a, cookies["alice"], "alice@A", user="alice"),
        connected(b, cookies["alice"], "alice@B", user="alice"),
        connected(b, None, "anon@B", user=None) as anon,
    ):
        error = await anon.request({"type": "join", "room": "lobby"})
        assert error["type"] == "error" and error["code"] == "unauthorized", error


async def test_foreign_origin_is_refused(servers, cookies):
    a, _ = servers
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            a.ws_url,
            additional_headers={"Origin": "http://evil.example", "Cookie": cookies["alice"]},
            proxy=None,
            open_timeout=FRAME_TIMEOUT,
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_messages_from_one_process_reach_the_other_in_order(servers, cookies):
    a, b = servers
    async with (
        connected(a, cookies["alice"], "alice@A", user="alice") as alice,
        connected(b, cookies["bob"], "bob@B", user="bob") as bob,
    ):
        head = (await bob.join("lobby"))["seq"]
        assert (await alice.join("lobby"))["seq"] == head

        refs = [await alice.post("lobby", {"n": n, "text": f"hello {n}"}) for n in range(20)]
        acks = await alice.replies(refs)
        assert [ack["type"] for ack in acks] == ["ack"] * 20, acks
        assert [ack["seq"] for ack in acks] == list(range(head + 1, head + 21))

        for client in (bob, alice):
            await client.wait_seq("lobby", head + 20)
            await client.settle()
            messages = client.messages("lobby")
            assert_timeline(messages, head + 1, head + 20, client.label)
            assert [m["payload"]["n"] for m in messages] == list(range(20))
            assert [m["id"] for m in messages] == [ack["id"] for ack in acks]
            assert {m["sender"]["name"] for m in messages} == {"alice"}


async def test_interleaved_senders_on_both_processes_share_one_sequence(servers, cookies):
    a, b = servers
    rounds = 20
    async with (
        connected(a, cookies["alice"], "alice@A", user="alice") as alice,
        connected(b, cookies["bob"], "bob@B", user="bob") as bob,
    ):
        head = (await alice.join("lobby"))["seq"]
        assert (await bob.join("lobby"))["seq"] == head

        # Pipelined, alternating: both processes race for the next seq in the database.
        refs: dict[str, list[str]] = {"alice": [], "bob": []}
        for n in range(rounds):
            refs["alice"].append(await alice.post("lobby", {"n": n, "from": "alice"}))
            refs["bob"].append(await bob.post("lobby", {"n": n, "from": "bob"}))
        acks = {"alice": await alice.replies(refs["alice"]), "bob": await bob.replies(refs["bob"])}
        for name, own in acks.items():
            assert [ack["type"] for ack in own] == ["ack"] * rounds, own
            seqs = [ack["seq"] for ack in own]
            assert seqs == sorted(set(seqs)), f"{name}'s acks out of order: {seqs}"
        acked = sorted(ack["seq"] for own in acks.values() for ack in own)
        last = head + 2 * rounds
        assert acked == list(range(head + 1, last + 1))

        timelines = []
        for client in (alice, bob):
            await client.wait_seq("lobby", last)
            await client.settle()
            messages = client.messages("lobby")
            assert_timeline(messages, head + 1, last, client.label)
            for name in ("alice", "bob"):
                mine = [m["payload"]["n"] for m in messages if m["payload"]["from"] == name]
                assert mine == list(range(rounds)), f"{client.label}: {name}'s order {mine}"
                assert all(m["sender"]["name"] == m["payload"]["from"] for m in messages), messages
            timelines.append([(m["seq"], m["id"], m["payload"]["from"]) for m in messages])
        assert timelines[0] == timelines[1]


async def test_rejoin_with_after_seq_replays_exactly_the_missed_messages(servers, cookies):
    a, b = servers
    missed = 50
    async with connected(a, cookies["alice"], "alice@A", user="alice") as alice:
        await alice.join("lobby")

        async with connected(a, cookies["bob"], "bob@A#1", user="bob") as bob:
            epoch = (await bob.join("lobby"))["epoch"]
            ack = await alice.request({"type": "send", "room": "lobby", "payload": {"n": -1}})
            assert ack["type"] == "ack", ack
            await bob.wait_seq("lobby", ack["seq"])
            last_seen = bob.messages("lobby")[-1]["seq"]
            assert last_seen == ack["seq"]
        # bob is gone; alice goes on talking.
        acks = await alice.replies([await alice.post("lobby", {"n": n}) for n in range(missed)])
        assert [x["seq"] for x in acks] == list(range(last_seen + 1, last_seen + missed + 1))

        # bob comes back, on the other process.
        async with connected(b, cookies["bob"], "bob@B#2", user="bob") as bob:
            rejoin = await bob.join("lobby", after_seq=last_seen, epoch=epoch)
            assert rejoin["recovered"] is True, rejoin
            assert rejoin["seq"] == last_seen + missed and rejoin["epoch"] == epoch, rejoin
            await bob.wait_seq("lobby", last_seen + missed)
            # hello, ack, presence_state, then exactly the missed messages, in order.
            assert [f["type"] for f in bob.frames[:3]] == ["hello", "ack", "presence_state"]
            replay = bob.frames[3 : 3 + missed]
            assert all(f["type"] == "message" for f in replay), replay
            assert_timeline(replay, last_seen + 1, last_seen + missed, "replay")
            assert [m["payload"]["n"] for m in replay] == list(range(missed))
            assert [m["id"] for m in replay] == [x["id"] for x in acks]

            # Then live ones, continuing the same sequence without a duplicate.
            live = await alice.replies([await alice.post("lobby", {"n": n}) for n in range(3)])
            await bob.wait_seq("lobby", live[-1]["seq"])
            await bob.settle()
            assert_timeline(bob.messages("lobby"), last_seen + 1, last_seen + missed + 3, "bob")


async def test_idle_connection_survives_and_still_gets_messages_from_the_other_process(
    servers, cookies
):
    a, b = servers
    offsets = {s.name: s.process.log_size() for s in servers}
    # No client keepalive pings: only the server (daphne pings every 20 s) may keep these up.
    async with (
        connected(b, cookies["bob"], "bob@B", user="bob", ping_interval=None) as bob,
        connected(a, cookies["alice"], "alice@A", user="alice", ping_interval=None) as alice,
    ):
        head = (await bob.join("lobby"))["seq"]
        assert (await alice.join("lobby"))["seq"] == head

        await asyncio.sleep(IDLE_SECONDS)  # the idle period under test, not synchronisation

        assert bob.ws.state is State.OPEN and alice.ws.state is State.OPEN
        ack = await alice.request({"type": "send", "room": "lobby", "payload": {"idle": True}})
        assert ack["type"] == "ack" and ack["seq"] == head + 1, ack
        await bob.wait_seq("lobby", head + 1, within=10)
        (message,) = bob.messages("lobby")
        assert message["payload"] == {"idle": True} and message["sender"]["name"] == "alice"

    # The hub's receive loop must not have died and restarted while idle (the trap shows as
    # "channel layer receive failed" with a redis TimeoutError, even when a retry recovers).
    for server in servers:
        log = server.process.log_since(offsets[server.name])
        assert "receive failed" not in log and "TimeoutError" not in log, log


async def test_private_room_refuses_non_members(servers, cookies):
    a, b = servers
    async with (
        connected(a, cookies["carol"], "carol@A", user="carol") as carol,
        connected(b, cookies["alice"], "alice@B", user="alice") as alice,
    ):
        refused = await carol.request({"type": "join", "room": "team"})
        assert refused["type"] == "error" and refused["code"] == "forbidden", refused
        sending = await carol.request({"type": "send", "room": "team", "payload": {"x": 1}})
        assert sending["type"] == "error" and sending["code"] == "not_joined", sending

        ack = await alice.join("team")
        sent = await alice.request({"type": "send", "room": "team", "payload": {"secret": 1}})
        assert sent["type"] == "ack" and sent["seq"] == ack["seq"] + 1, sent

        # carol's connection is still usable, and never saw the private room.
        await carol.join("lobby")
        await carol.settle()
        assert carol.ws.state is State.OPEN
        assert not [f for f in carol.frames if f.get("room") == "team"], carol.frames
