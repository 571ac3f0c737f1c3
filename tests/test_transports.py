"""The three transports honour one contract, against two real daphne processes and Redis.

One scenario runs over WebSocket, Server-Sent Events and long-polling (phoenix-style
integration tests): join, send, ack, receive, disconnect, miss messages, resume on the other
process, and receive exactly the missed ones in order, then live ones. The SSE and long-poll
clients below speak raw HTTP/1.1 over asyncio streams, so what is tested is the wire format of
docs/transports.md, not a library's reading of it.

Nothing sleeps to synchronise: every wait reads until a predicate holds, under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.servers import DaphneServer, RealtimeStack, login, realtime_stack, tracebacks

pytestmark = pytest.mark.integration

Frame = dict[str, Any]
WAIT = 15.0  # seconds any expected frame may take
MAX_READS = 2_000  # frames or events one wait may read (bounds every loop)
CSRF = "transportcontracttoken0123456789"  # any 32-char secret: cookie and header must match
TRANSPORTS = ["websocket", "sse", "longpoll"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealtimeStack]:
    workdir: Path = tmp_path_factory.mktemp("realtime-transports")
    with realtime_stack(workdir, daphnes=2) as running:
        yield running
    bad = {s.name: s.process.log() for s in running.servers if tracebacks(s.process.log())}
    for name, text in bad.items():
        print(f"===== {name} log =====\n{text}")
    assert not bad, f"Traceback in the log of {sorted(bad)} (printed above)"


@pytest.fixture(scope="module")
def cookies(stack: RealtimeStack) -> dict[str, str]:
    return {name: f"{login(stack.servers[0], name)}; csrftoken={CSRF}" for name in ("alice", "bob")}


@pytest.fixture
def servers(stack: RealtimeStack) -> tuple[DaphneServer, DaphneServer]:
    for process in stack.processes():
        process.assert_alive()
    a, b = stack.servers
    return a, b


# -- plain HTTP over asyncio streams ---------------------------------------------------------


class Http:
    """One HTTP/1.1 exchange; the body is read incrementally (chunked or to the end)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunked = False
        self._buffer = b""
        self._eof = False

    @classmethod
    async def open(
        cls,
        server: DaphneServer,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes = b"",
    ) -> Http:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", server.port), WAIT
        )
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        http = cls(reader, writer)
        async with asyncio.timeout(WAIT + 30):
            status = (await reader.readline()).decode()
            http.status = int(status.split()[1])
            for _ in range(100):
                line = (await reader.readline()).decode().strip()
                if not line:
                    break
                name, _, value = line.partition(":")
                http.headers[name.strip().lower()] = value.strip()
        http._chunked = http.headers.get("transfer-encoding", "").lower() == "chunked"
        return http

    async def _more(self) -> bool:
        if self._eof:
            return False
        if not self._chunked:
            data = await self.reader.read(65536)
            self._eof = not data
            self._buffer += data
            return bool(data)
        size = int((await self.reader.readline()).strip() or b"0", 16)
        if size == 0:
            self._eof = True
            return False
        self._buffer += await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return True

    async def readline(self) -> str | None:
        """One line of the body (without its newline), or None at its end."""
        for _ in range(100_000):
            if b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                return line.decode()
            if not await self._more():
                return None
        raise AssertionError("a body line never ended")

    async def body(self) -> bytes:
        async with asyncio.timeout(WAIT + 30):
            for _ in range(100_000):
                if not await self._more():
                    break
        data, self._buffer = self._buffer, b""
        return data

    async def json(self) -> Any:
        return json.loads(await self.body())

    def close(self) -> None:
        self.writer.close()


async def http_json(
    server: DaphneServer, method: str, path: str, cookie: str | None, body: Any = None
) -> tuple[int, Any]:
    headers = {"Connection": "close", "Accept": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        headers |= {"Content-Type": "application/json", "X-CSRFToken": CSRF}
    http = await Http.open(server, method, path, headers, data)
    try:
        return http.status, await http.json()
    finally:
        http.close()


# -- one client per transport, with the same interface ---------------------------------------


class Sub:
    """A client of one transport: ``frames`` holds every frame received, in order."""

    transport = ""

    def __init__(self, label: str) -> None:
        self.label = label
        self.frames: list[Frame] = []
        self.cursor: str | None = None  # the transport's resume token (WS: after_seq/epoch)

    async def open(self, server: DaphneServer, cookie: str, room: str, resume: Any) -> None:
        raise NotImplementedError

    async def _read(self) -> list[Frame]:
        """Read the next frame(s) from the transport."""
        raise NotImplementedError

    async def send(self, server: DaphneServer, cookie: str, room: str, payload: Frame) -> Frame:
        status, body = await http_json(
            server, "POST", f"/realtime/api/rooms/{room}/messages", cookie, {"payload": payload}
        )
        assert status == 201, (status, body)
        return body

    async def close(self) -> None:
        raise NotImplementedError

    async def wait_for(self, predicate: Callable[[Frame], bool], count: int = 1) -> list[Frame]:
        matched = [f for f in self.frames if predicate(f)]
        try:
            async with asyncio.timeout(WAIT):
                for _ in range(MAX_READS):
                    if len(matched) >= count:
                        return matched
                    for frame in await self._read():
                        assert frame["type"] != "error", f"{self.label}: {frame}"
                        if predicate(frame):
                            matched.append(frame)
        except TimeoutError:
            pass
        raise AssertionError(f"{self.label}: {len(matched)}/{count} within {WAIT} s: {self.frames}")

    def messages(self, room: str) -> list[Frame]:
        return [f for f in self.frames if f["type"] == "message" and f["room"] == room]

    def join_ack(self, room: str) -> Frame:
        return next(
            f
            for f in self.frames
            if f["type"] == "ack" and f.get("room") == room and "recovered" in f
        )


class WsSub(Sub):
    transport = "websocket"

    async def open(self, server, cookie, room, resume):
        self._cm = connect(
            server.ws_url,
            additional_headers={"Origin": server.origin, "Cookie": cookie},
            proxy=None,
            open_timeout=WAIT,
        )
        self.ws = await self._cm.__aenter__()
        join: Frame = {"type": "join", "room": room, "ref": "j"}
        if resume is not None:
            join |= resume
        await self.ws.send(json.dumps(join))
        await self.wait_for(lambda f: f["type"] == "presence_state")

    async def _read(self):
        frame = json.loads(await self.ws.recv())
        self.frames.append(frame)
        return [frame]

    async def send(self, server, cookie, room, payload):
        await self.ws.send(
            json.dumps({"type": "send", "room": room, "payload": payload, "ref": "s"})
        )
        (ack,) = await self.wait_for(lambda f: f["type"] == "ack" and f.get("ref") == "s")
        self.frames.remove(ack)  # the next send reuses the ref
        return ack

    def resume_token(self, room):
        last = self.messages(room)[-1]["seq"]
        return {"after_seq": last, "epoch": self.join_ack(room)["epoch"]}

    async def close(self):
        await self._cm.__aexit__(None, None, None)


class SseSub(Sub):
    transport = "sse"

    async def open(self, server, cookie, room, resume):
        headers = {"Cookie": cookie, "Accept": "text/event-stream"}
        if resume is not None:
            headers["Last-Event-ID"] = resume  # what a reconnecting EventSource sends
        self.http = await Http.open(server, "GET", f"/realtime/sse/?rooms={room}", headers)
        assert self.http.status == 200, (self.http.status, await self.http.body())
        assert self.http.headers["content-type"].startswith("text/event-stream")
        assert self.http.headers["cache-control"] == "no-cache"
        self.ids: list[str] = []
        await self.wait_for(lambda f: f["type"] == "presence_state")

    async def _read(self):
        event: dict[str, str] = {}
        for _ in range(1000):
            line = await self.http.readline()
            assert line is not None, f"{self.label}: the stream ended"
            if line == "":
                if "data" in event:
                    break
                event = {}
                continue
            if line.startswith(":") or line.startswith("retry:"):
                continue
            name, _, value = line.partition(": ")
            assert name not in event, f"{self.label}: {name} twice in one event"
            event[name] = value
        frame = json.loads(event["data"])
        assert event["event"] == frame["type"], event
        self.ids.append(event["id"])
        self.cursor = event["id"]
        self.frames.append(frame)
        return [frame]

    def resume_token(self, room):
        return self.ids[-1]

    async def close(self):
        self.http.close()


class PollSub(Sub):
    transport = "longpoll"

    async def open(self, server, cookie, room, resume):
        self.server, self.cookie, self.room = server, cookie, room
        self.cursor = resume or ""
        self.polls = 0
        await self.wait_for(lambda f: f["type"] == "presence_state")

    async def _read(self):
        query = urllib.parse.urlencode({"rooms": self.room, "cursor": self.cursor, "timeout": 5})
        status, body = await http_json(self.server, "GET", f"/realtime/poll/?{query}", self.cookie)
        assert status == 200, body
        self.polls += 1
        assert isinstance(body["cursor"], str) and isinstance(body["frames"], list), body
        self.cursor = body["cursor"]
        self.frames.extend(body["frames"])
        return body["frames"]

    async def send(self, server, cookie, room, payload):
        # The long-poll endpoint's own POST (the messages API's body plus "room").
        status, body = await http_json(
            server, "POST", "/realtime/poll/", cookie, {"room": room, "payload": payload}
        )
        assert status == 201, (status, body)
        return body

    def resume_token(self, room):
        return self.cursor

    async def close(self):
        pass


SUBS = {"websocket": WsSub, "sse": SseSub, "longpoll": PollSub}


@contextlib.asynccontextmanager
async def ws_sender(server: DaphneServer, cookie: str, room: str):
    sub = WsSub("alice@ws")
    await sub.open(server, cookie, room, None)
    try:
        yield sub
    finally:
        await sub.close()


def assert_exactly(messages: list[Frame], first: int, last: int, label: str) -> None:
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(first, last + 1)), f"{label}: {seqs}"


# -- the contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_contract_join_send_receive_disconnect_resume(transport, servers, cookies):
    a, b = servers
    started = time.monotonic()
    bob = SUBS[transport](f"bob@{transport}#1")
    async with ws_sender(b, cookies["alice"], "lobby") as alice:
        # join
        await bob.open(a, cookies["bob"], "lobby", None)
        ack = bob.join_ack("lobby")
        assert ack["recovered"] is False and ack["epoch"] >= 1, ack
        head = ack["seq"]
        assert alice.join_ack("lobby")["seq"] >= head

        # send and ack, then receive: the own message and another process's, in order
        own = await bob.send(a, cookies["bob"], "lobby", {"text": "from bob"})
        assert own["seq"] == head + 1, own
        other = await alice.send(b, cookies["alice"], "lobby", {"text": "from alice"})
        assert other["seq"] == head + 2, other
        await bob.wait_for(lambda f: f["type"] == "message" and f["seq"] == head + 2)
        got = bob.messages("lobby")
        assert_exactly(got, head + 1, head + 2, bob.label)
        assert [m["id"] for m in got] == [own["id"], other["id"]]
        assert [m["sender"]["name"] for m in got] == ["bob", "alice"]

        # disconnect; miss ten
        resume = bob.resume_token("lobby")
        await bob.close()
        missed = [
            (await alice.send(b, cookies["alice"], "lobby", {"n": n}))["seq"] for n in range(10)
        ]
        assert missed == list(range(head + 3, head + 13))

        # resume on the other process: exactly the missed ones, in order, then live
        again = SUBS[transport](f"bob@{transport}#2")
        await again.open(b, cookies["bob"], "lobby", resume)
        rejoin = again.join_ack("lobby")
        assert rejoin["recovered"] is True and rejoin["seq"] == head + 12, rejoin
        await again.wait_for(lambda f: f["type"] == "message" and f["seq"] == head + 12)
        live = await alice.send(b, cookies["alice"], "lobby", {"live": True})
        await again.wait_for(lambda f: f["type"] == "message" and f["seq"] == live["seq"])
        replay = again.messages("lobby")
        assert_exactly(replay, head + 3, head + 13, again.label)
        assert [m["payload"] for m in replay[:10]] == [{"n": n} for n in range(10)]
        if transport != "longpoll":
            # One connection: hello, the join's ack and presence_state, then the messages.
            kinds = [f["type"] for f in again.frames if f["type"] != "presence_diff"]
            assert kinds[:3] == ["hello", "ack", "presence_state"], kinds
        if transport == "sse":
            epoch = rejoin["epoch"]
            assert again.ids[-1] == f"lobby:{head + 13}:{epoch}", again.ids
        await again.close()
    print(f"contract over {transport}: {time.monotonic() - started:.2f} s")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_in_another_epoch_is_not_recovered(transport, servers, cookies):
    a, _ = servers
    sub = SUBS[transport](f"bob@{transport}")
    resume: Any = {"after_seq": 1, "epoch": 999} if transport == "websocket" else "lobby:1:999"
    await sub.open(a, cookies["bob"], "lobby", resume)
    ack = sub.join_ack("lobby")
    assert ack["recovered"] is False and ack["epoch"] != 999, ack
    assert sub.messages("lobby") == []
    if transport == "sse":
        assert sub.ids[-1] == f"lobby:{ack['seq']}:{ack['epoch']}"
    if transport == "longpoll":
        assert sub.cursor == f"lobby:{ack['seq']}:{ack['epoch']}"
    await sub.close()


# -- SSE specifics ---------------------------------------------------------------------------


async def test_sse_after_parameter_resumes_and_refused_rooms_get_error_events(servers, cookies):
    a, b = servers
    async with ws_sender(b, cookies["alice"], "lobby") as alice:
        head = alice.join_ack("lobby")["seq"]
        sent = [(await alice.send(b, cookies["alice"], "lobby", {"n": n}))["seq"] for n in range(3)]
        sub = SseSub("bob@sse")
        headers = {"Cookie": cookies["bob"], "Accept": "text/event-stream"}
        # team is private (bob is a member in the demo), nowhere does not exist
        path = f"/realtime/sse/?rooms=lobby,nowhere&after=lobby:{head}"
        sub.http = await Http.open(a, "GET", path, headers)
        sub.ids = []
        assert sub.http.status == 200
        await sub.wait_for(lambda f: f["type"] == "message" and f["seq"] == sent[-1], count=1)
        kinds = [(f["type"], f.get("room") or f.get("ref")) for f in sub.frames]
        assert kinds[:4] == [
            ("hello", None),
            ("ack", "lobby"),
            ("presence_state", "lobby"),
            ("message", "lobby"),
        ], kinds
        error = await asyncio.wait_for(_next_error(sub), WAIT)
        assert error == {
            "type": "error",
            "code": "room_not_found",
            "message": "room 'nowhere' does not exist",
            "ref": "nowhere",
        }
        assert_exactly(sub.messages("lobby"), head + 1, sent[-1], "after=")
        assert sub.ids[-1].startswith(f"lobby:{sent[-1]}:")
        assert "nowhere" not in sub.ids[-1]
        await sub.close()


async def _next_error(sub: Sub) -> Frame:
    for frame in sub.frames:
        if frame["type"] == "error":
            return frame
    for _ in range(MAX_READS):
        for frame in await sub._read():
            if frame["type"] == "error":
                return frame
    raise AssertionError("no error frame")


@pytest.mark.parametrize(
    ("query", "headers", "status", "code"),
    [
        ("rooms=Lobby", {}, 400, "invalid_room"),
        ("rooms=lobby,,team", {}, 400, "invalid_room"),
        ("rooms=" + ",".join(f"r{n}" for n in range(21)), {}, 400, "bad_frame"),
        ("rooms=lobby&after=lobby", {}, 400, "bad_frame"),
        ("rooms=lobby&after=lobby:-1", {}, 400, "bad_frame"),
        ("rooms=lobby", {"Last-Event-ID": "lobby:1:x"}, 400, "bad_frame"),
        ("rooms=nowhere", {}, 404, "room_not_found"),
        ("rooms=team", {"anonymous": "1"}, 401, "unauthorized"),
    ],
)
async def test_sse_bad_input_gets_a_json_error(query, headers, status, code, servers, cookies):
    a, _ = servers
    anonymous = headers.pop("anonymous", None)
    if not anonymous:
        headers["Cookie"] = cookies["bob"]
    http = await Http.open(a, "GET", f"/realtime/sse/?{query}", headers | {"Connection": "close"})
    try:
        assert http.status == status
        assert http.headers["content-type"] == "application/json"
        body = await http.json()
        assert body["error"]["code"] == code, body
    finally:
        http.close()


async def test_sse_accepts_a_single_use_ticket_instead_of_the_session(servers, cookies):
    a, b = servers
    status, issued = await http_json(a, "POST", "/realtime/api/tickets", cookies["bob"], {})
    assert status == 201, issued
    path = f"/realtime/sse/?rooms=lobby&ticket={urllib.parse.quote(issued['ticket'])}"
    sub = SseSub("ticket@sse")
    sub.http = await Http.open(b, "GET", path, {"Accept": "text/event-stream"})  # no cookie
    sub.ids = []
    assert sub.http.status == 200
    (hello,) = await sub.wait_for(lambda f: f["type"] == "hello")
    assert hello["user"]["name"] == "bob", hello
    await sub.wait_for(lambda f: f["type"] == "presence_state")
    await sub.close()
    again = await Http.open(b, "GET", path, {"Connection": "close"})
    try:
        assert again.status == 401
        assert (await again.json())["error"]["code"] == "unauthorized"
    finally:
        again.close()


async def test_sse_other_methods_are_refused(servers, cookies):
    a, _ = servers
    status, body = await http_json(a, "POST", "/realtime/sse/?rooms=lobby", cookies["bob"], {})
    assert status == 405 and body["error"]["code"] == "bad_frame", body


async def test_sse_client_is_present_while_streaming_and_leaves_on_disconnect(servers, cookies):
    a, b = servers
    sub = SseSub("bob@sse")
    await sub.open(a, cookies["bob"], "lobby", None)

    async def bob_online() -> bool:
        status, body = await http_json(
            b, "GET", "/realtime/api/rooms/lobby/presence", cookies["alice"]
        )
        assert status == 200, body
        return any(u["name"] == "bob" for u in body["users"])

    assert await bob_online()
    await sub.close()
    # daphne reports the disconnect, Django cancels the stream, the session leaves the room.
    deadline = time.monotonic() + WAIT
    for _ in range(1000):
        if not await bob_online():
            break
        assert time.monotonic() < deadline, "bob still present after the SSE client left"
        await asyncio.sleep(0.1)  # polling interval of a deadline-bounded wait


# -- long-poll specifics ---------------------------------------------------------------------


async def test_longpoll_waits_then_answers_with_no_messages_and_the_same_cursor(servers, cookies):
    a, _ = servers
    # A room no other test here joins: lobby may still get a presence diff of an earlier
    # test's leave (diffs are held up to REALTIME_PRESENCE_DIFF_INTERVAL), which is news.
    first = PollSub("bob@poll")
    await first.open(a, cookies["bob"], "team", None)
    cursor = first.cursor
    query = urllib.parse.urlencode({"rooms": "team", "cursor": cursor, "timeout": 1.5})
    started = time.monotonic()
    status, body = await http_json(a, "GET", f"/realtime/poll/?{query}", cookies["bob"])
    waited = time.monotonic() - started
    assert status == 200, body
    assert body["cursor"] == cursor
    assert [f["type"] for f in body["frames"]] == ["hello", "ack", "presence_state"], body
    assert body["frames"][1]["recovered"] is True
    assert 1.4 <= waited < 5, waited


async def test_longpoll_answers_as_soon_as_a_message_arrives(servers, cookies):
    a, b = servers
    first = PollSub("bob@poll")
    await first.open(a, cookies["bob"], "lobby", None)
    query = urllib.parse.urlencode({"rooms": "lobby", "cursor": first.cursor, "timeout": 20})
    async with ws_sender(b, cookies["alice"], "lobby") as alice:
        started = time.monotonic()
        waiting = asyncio.create_task(
            http_json(a, "GET", f"/realtime/poll/?{query}", cookies["bob"])
        )
        sent = await alice.send(b, cookies["alice"], "lobby", {"wake": True})
        status, body = await asyncio.wait_for(waiting, WAIT)
        waited = time.monotonic() - started
    assert status == 200, body
    messages = [f for f in body["frames"] if f["type"] == "message"]
    assert [m["seq"] for m in messages] == [sent["seq"]]
    assert body["cursor"].startswith(f"lobby:{sent['seq']}:")
    assert waited < 10, waited


async def test_longpoll_client_is_not_counted_in_presence(servers, cookies):
    a, _ = servers
    query = urllib.parse.urlencode({"rooms": "lobby", "timeout": 0})
    status, body = await http_json(a, "GET", f"/realtime/poll/?{query}", cookies["bob"])
    assert status == 200
    states = [f for f in body["frames"] if f["type"] == "presence_state"]
    assert len(states) == 1 and all(u["name"] != "bob" for u in states[0]["users"]), states


@pytest.mark.parametrize(
    ("method", "query", "body", "status", "code"),
    [
        ("GET", "", None, 400, "invalid_room"),
        ("GET", "rooms=lobby&cursor=lobby:abc", None, 400, "bad_frame"),
        ("GET", "rooms=lobby&timeout=26", None, 400, "bad_frame"),
        ("GET", "rooms=lobby&timeout=-1", None, 400, "bad_frame"),
        ("GET", "rooms=nowhere", None, 404, "room_not_found"),
        ("POST", "", {"payload": {"x": 1}}, 400, "invalid_room"),
        ("POST", "", {"room": "lobby"}, 400, "bad_frame"),
        ("POST", "", {"room": "nowhere", "payload": {"x": 1}}, 404, "room_not_found"),
        ("PUT", "", {}, 405, "bad_frame"),
    ],
)
async def test_longpoll_bad_input_gets_a_json_error(
    method, query, body, status, code, servers, cookies
):
    a, _ = servers
    got, answer = await http_json(a, method, f"/realtime/poll/?{query}", cookies["bob"], body)
    assert (got, answer["error"]["code"]) == (status, code), answer


async def test_longpoll_post_needs_the_csrf_token(servers, cookies):
    a, _ = servers
    http = await Http.open(
        a,
        "POST",
        "/realtime/poll/",
        {"Cookie": cookies["bob"], "Content-Type": "application/json", "Connection": "close"},
        json.dumps({"room": "lobby", "payload": {"x": 1}}).encode(),
    )
    try:
        assert http.status == 403
        assert (await http.json())["error"]["code"] == "forbidden"
    finally:
        http.close()


# -- in-process: keep-alive, drain and disconnect through Django's own ASGI handler ----------


class AsgiRequest:
    """One request through Django's ASGIHandler, read message by message (no server)."""

    def __init__(self, path: str, query: str, cookie: str) -> None:
        from django.core.asgi import get_asgi_application

        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": [(b"host", b"127.0.0.1"), (b"cookie", cookie.encode())],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 80),
        }
        self.inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        self.task = asyncio.create_task(
            get_asgi_application()(scope, self.inbox.get, self.outbox.put)
        )

    async def message(self, within: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.outbox.get(), within)

    async def start(self) -> int:
        started = await self.message()
        assert started["type"] == "http.response.start", started
        return started["status"]

    async def chunk(self, within: float = 5.0) -> dict[str, Any]:
        body = await self.message(within)
        assert body["type"] == "http.response.body", body
        return body

    async def events_until(self, marker: bytes, within: float = 5.0) -> bytes:
        seen = b""
        async with asyncio.timeout(within):
            for _ in range(MAX_READS):
                seen += (await self.chunk(within))["body"]
                if marker in seen:
                    return seen
        raise AssertionError(f"{marker!r} never came: {seen!r}")

    async def disconnect(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, 5.0)


@pytest.fixture
def in_process(monkeypatch, hub, users, rooms, async_client):
    from realtime import drain

    monkeypatch.setattr(drain, "_draining", False)
    return drain


async def _cookie(async_client, user) -> str:
    await async_client.aforce_login(user)
    return f"sessionid={async_client.cookies['sessionid'].value}"


@pytest.mark.django_db(transaction=True)
async def test_sse_writes_keepalive_comments_while_silent(
    in_process, users, async_client, settings
):
    settings.REALTIME_SSE_KEEPALIVE = 0.2
    request = AsgiRequest(
        "/realtime/sse/", "rooms=lobby", await _cookie(async_client, users["bob"])
    )
    assert await request.start() == 200
    await request.events_until(b"event: presence_state")
    started = time.monotonic()
    seen = await request.events_until(b": keepalive\n\n")
    assert seen.endswith(b": keepalive\n\n")
    assert time.monotonic() - started < 2
    await request.disconnect()
    assert in_process.live_count() == 0


@pytest.mark.django_db(transaction=True)
async def test_drain_ends_sse_streams_and_answers_waiting_polls(in_process, users, async_client):
    drain = in_process
    cookie = await _cookie(async_client, users["bob"])
    stream = AsgiRequest("/realtime/sse/", "rooms=lobby", cookie)
    assert await stream.start() == 200
    await stream.events_until(b"event: presence_state")
    poll = AsgiRequest("/realtime/poll/", "rooms=lobby&cursor=lobby:0:1&timeout=20", cookie)
    for _ in range(MAX_READS):  # until the poll has joined and waits
        if drain.live_count() == 2:
            break
        await asyncio.sleep(0.01)
    assert drain.live_count() == 2

    started = time.monotonic()
    assert await drain.drain_all(grace=5) == 0
    assert time.monotonic() - started < 2
    ending = await stream.events_until(b": closed 1012\n\n")
    assert ending.endswith(b": closed 1012\n\n")
    assert (await stream.chunk()).get("more_body", False) is False
    assert await poll.start() == 200
    answer = json.loads((await poll.chunk())["body"])
    assert answer["cursor"] == "lobby:0:1" and answer["frames"][0]["type"] == "hello"

    # While draining, new clients are sent elsewhere.
    late = AsgiRequest("/realtime/sse/", "rooms=lobby", cookie)
    assert await late.start() == 503
    assert json.loads((await late.chunk())["body"])["error"]["code"] == "unavailable"
    for request in (stream, poll, late):
        await asyncio.wait_for(request.task, 5)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "query", "ending"),
    [
        ("/realtime/sse/", "rooms=lobby", b": closed 1012\n\n"),
        ("/realtime/poll/", "rooms=lobby&cursor=lobby:0:1&timeout=20", b'"hello"'),
    ],
    ids=["sse", "longpoll"],
)
async def test_a_client_that_registers_after_the_drain_began_is_told_to_go(
    in_process, users, async_client, monkeypatch, path, query, ending
):
    # The race CI hit: the request passes its draining() check, awaits its login, and only
    # then registers; drain_all has already taken its (empty) list. Without the late drain the
    # poll waits its full timeout (20 s here) and the server's shutdown waits with it.
    from realtime import longpoll, sse

    drain = in_process
    cookie = await _cookie(async_client, users["bob"])
    entered, release = asyncio.Event(), asyncio.Event()
    real = sse.authenticate

    async def slow_login(request):
        entered.set()
        await release.wait()
        return await real(request)

    monkeypatch.setattr(sse, "authenticate", slow_login)
    monkeypatch.setattr(longpoll, "authenticate", slow_login)
    request = AsgiRequest(path, query, cookie)
    await asyncio.wait_for(entered.wait(), 5)
    assert await drain.drain_all(grace=5) == 0  # nothing registered yet
    release.set()

    assert await request.start() == 200
    assert ending in await request.events_until(ending)
    await asyncio.wait_for(request.task, 5)
    assert drain.live_count() == 0


# -- behind nginx, and through a drain -------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_stack(tmp_path_factory):
    """The deployed topology (PostgreSQL, two daphnes per the systemd unit, nginx)."""
    from tests import servers

    with servers.seeded_postgres_template() as template:
        workdir = tmp_path_factory.mktemp("transports-nginx")
        with servers.deployed_stack(workdir, template) as stack:
            yield stack
    bad = {name: text for name, text in stack.logs().items() if tracebacks(text)}
    assert not bad, bad


async def test_sse_and_longpoll_through_nginx_are_not_buffered(nginx_stack):
    nginx = nginx_stack.nginx
    cookie = f"{login(nginx_stack.servers[0], 'bob')}; csrftoken={CSRF}"
    alice = f"{login(nginx_stack.servers[1], 'alice')}; csrftoken={CSRF}"
    sub = SseSub("bob@nginx")
    started = time.monotonic()
    await sub.open(nginx, cookie, "lobby", None)  # the first events pass at once
    head = sub.join_ack("lobby")["seq"]
    poll = PollSub("carol@nginx")
    await poll.open(nginx, alice, "lobby", None)
    query = urllib.parse.urlencode({"rooms": "lobby", "cursor": poll.cursor, "timeout": 20})
    waiting = asyncio.create_task(http_json(nginx, "GET", f"/realtime/poll/?{query}", alice))
    sent = await sub.send(nginx, alice, "lobby", {"via": "nginx"})
    assert sent["seq"] == head + 1
    await sub.wait_for(lambda f: f["type"] == "message" and f["seq"] == head + 1)
    status, body = await asyncio.wait_for(waiting, WAIT)
    assert status == 200 and [f["seq"] for f in body["frames"] if f["type"] == "message"] == [
        head + 1
    ]
    assert time.monotonic() - started < 10
    await sub.close()


async def test_sigterm_ends_sse_streams_and_answers_polls_then_they_resume_elsewhere(tmp_path):
    with realtime_stack(tmp_path, daphnes=2) as stack:
        a, b = stack.servers
        bob = f"{login(a, 'bob')}; csrftoken={CSRF}"
        alice = f"{login(b, 'alice')}; csrftoken={CSRF}"
        sub = SseSub("bob@A")
        await sub.open(a, bob, "lobby", None)
        head = sub.join_ack("lobby")["seq"]
        first = await sub.send(b, alice, "lobby", {"n": 0})
        await sub.wait_for(lambda f: f["type"] == "message" and f["seq"] == first["seq"])
        poll = PollSub("bob@A/poll")
        await poll.open(a, bob, "lobby", None)
        query = urllib.parse.urlencode({"rooms": "lobby", "cursor": poll.cursor, "timeout": 20})
        waiting = asyncio.create_task(http_json(a, "GET", f"/realtime/poll/?{query}", bob))
        for _ in range(MAX_READS):  # until A serves both (its health counts them)
            status, health = await http_json(a, "GET", "/healthz", None)
            if health["checks"]["process"].get("connections", 0) >= 2:
                break
            await asyncio.sleep(0.05)  # polling interval of a bounded wait
        started = time.monotonic()
        code = await asyncio.to_thread(a.process.terminate, 20)
        drained = time.monotonic() - started
        assert code == 0, a.process.log()
        status, body = await asyncio.wait_for(waiting, WAIT)
        assert status == 200 and body["cursor"] == poll.cursor, body
        rest = []
        for _ in range(MAX_READS):
            line = await asyncio.wait_for(sub.http.readline(), WAIT)
            if line is None:
                break
            rest.append(line)
        assert ": closed 1012" in rest, rest
        missed = [(await sub.send(b, alice, "lobby", {"n": n}))["seq"] for n in range(1, 6)]

        again = SseSub("bob@B")
        await again.open(b, bob, "lobby", sub.resume_token("lobby"))
        assert again.join_ack("lobby")["recovered"] is True
        await again.wait_for(lambda f: f["type"] == "message" and f["seq"] == missed[-1])
        assert_exactly(again.messages("lobby"), head + 2, missed[-1], again.label)
        await again.close()
        assert "draining" in a.process.log() and "still open after" not in a.process.log()
        assert not tracebacks(a.process.log()), a.process.log()
        print(f"drain of an SSE stream and a poll: {drained:.2f} s")
