"""realtime under uvicorn, the documented alternative ASGI server (docs/performance.md).

A client that stops reading must not hold up anybody else: under uvicorn the ASGI ``send``
waits once the socket's buffer is full, and before the consumer's outbox (consumers.py) one
such client stopped every broadcast of its process. A real uvicorn process, a real Redis,
a raw socket that never reads, and a client that does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from realtime import backpressure
from tests import servers
from tests.servers import DaphneServer, login, tracebacks

pytestmark = pytest.mark.integration

API_KEY = "uvicorn-test-key"
SIZE = 10 * 1024
# Published until the slow client's close, then AFTER more; at most MAX_COUNT (60 MB, far
# past what the kernel buffers for a socket; 1,500 were needed here with 4 MB send buffers).
MAX_COUNT, AFTER = 6_000, 300
DEADLINE = 120.0
STALL = 20.0  # longest the reading client may go without a message while some are due


@dataclass
class UvicornStack:
    env: dict[str, str]
    logdir: Path
    server: DaphneServer

    def another(self, label: str) -> contextlib.AbstractContextManager[DaphneServer]:
        """One more uvicorn process on the same Redis and database."""
        return servers.running_daphne(self.env, self.logdir, label, server="uvicorn")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornStack]:
    workdir: Path = tmp_path_factory.mktemp("realtime-uvicorn")
    with servers.running_redis(workdir / "redis") as redis:
        env = servers.django_env(workdir / "db.sqlite3", redis.url)
        servers.prepare_database(env)
        env["DJANGO_SETTINGS_MODULE"] = "tests.attack_settings"
        env["REALTIME_TEST_OVERRIDES"] = json.dumps({"REALTIME_API_KEY": API_KEY})
        running = UvicornStack(env, workdir / "logs", None)  # type: ignore[arg-type]
        with running.another("U") as server:
            running.server = server
            yield running
            log = server.process.log()
            assert tracebacks(log) == [], log[-5000:]


def publish_past_the_slow_close(server: DaphneServer, offset: int) -> list[int]:
    """Publish messages of SIZE bytes into the lobby through the HTTP API until the server
    has closed a slow consumer, then AFTER more; their seqs."""
    blob = "x" * SIZE
    conn = HTTPConnection(servers.LOOPBACK, server.port, timeout=30)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    seqs: list[int] = []
    closed_at: int | None = None
    try:
        for i in range(MAX_COUNT):
            body = json.dumps({"room": "lobby", "payload": {"n": i, "blob": blob}})
            conn.request("POST", "/realtime/api/publish", body, headers)
            response = conn.getresponse()
            answer = response.read()
            assert response.status == 201, answer
            seqs.append(json.loads(answer)["seq"])
            checking = closed_at is None and i % 50 == 0
            if checking and "slow consumer with" in server.process.log_since(offset):
                closed_at = i
            if closed_at is not None and i >= closed_at + AFTER:
                return seqs
    finally:
        conn.close()
    raise AssertionError(f"no slow-consumer close after {MAX_COUNT} messages of {SIZE} bytes")


def owns_connection(pid: int, local_port: int, remote_port: int) -> bool:
    """Whether process ``pid`` still holds its TCP socket from ``local_port`` to
    ``remote_port`` (a socket it closed is an orphan of the kernel's, of inode 0)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == (
            remote_port
        ):
            inode = fields[9]
    if inode is None or inode == "0":
        return False
    target = f"socket:[{inode}]"
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd) == target for fd in fds.iterdir() if fd.is_symlink())


class RawClient:
    """A WebSocket client on a plain socket with a tiny receive buffer, read only at the end."""

    def __init__(self, server: DaphneServer, cookie: str) -> None:
        self.sock = socket.create_connection((servers.LOOPBACK, server.port), timeout=10)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws/ HTTP/1.1\r\nHost: {servers.LOOPBACK}:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\nOrigin: {server.origin}\r\nCookie: {cookie}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.data = b""
        while b"\r\n\r\n" not in self.data:
            chunk = self.sock.recv(4096)
            assert chunk, "closed during the handshake"
            self.data += chunk
        head, self.data = self.data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_text(self, text: str) -> None:
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def read_what_came(self, quiet: float = 2.0) -> tuple[list[dict[str, Any]], int | None]:
        """Read until nothing comes for ``quiet`` seconds (bounded): the whole frames read
        (text frames decoded) and the close code, if the close frame came."""
        self.sock.settimeout(quiet)
        with contextlib.suppress(OSError):  # a timeout, or the connection reset by the drop
            for _ in range(10_000):
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                self.data += chunk
        self.sock.close()
        return self._frames()

    def _frames(self) -> tuple[list[dict[str, Any]], int | None]:
        frames, code, data = [], None, self.data
        while len(data) >= 2:
            opcode, length, at = data[0] & 0x0F, data[1] & 0x7F, 2
            if length == 126:
                (length,), at = struct.unpack("!H", data[2:4]), 4
            elif length == 127:
                (length,), at = struct.unpack("!Q", data[2:10]), 10
            if len(data) < at + length:
                break  # cut off by the drop
            payload, data = data[at : at + length], data[at + length :]
            if opcode == 0x1:
                frames.append(json.loads(payload))
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0]
                break
        return frames, code


async def test_a_client_that_stops_reading_holds_up_nobody(stack):
    server = stack.server
    cookie = login(server, "alice")
    offset = server.process.log_size()
    slow = RawClient(server, cookie)
    slow.send_text(json.dumps({"type": "join", "room": "lobby", "ref": "j"}))
    async with server.websocket(cookie) as reader:
        assert json.loads(await reader.recv())["type"] == "hello"
        await reader.send(json.dumps({"type": "join", "room": "lobby", "ref": "j"}))
        while (ack := json.loads(await reader.recv()))["type"] != "ack":
            pass
        head = ack["seq"]
        publishing = asyncio.create_task(
            asyncio.to_thread(publish_past_the_slow_close, server, offset)
        )
        seqs: list[int] = []
        deadline = time.monotonic() + DEADLINE
        receiving: asyncio.Future[Any] | None = None
        while not publishing.done() or len(seqs) < len(publishing.result()):
            assert time.monotonic() < deadline, f"{len(seqs)} messages in {DEADLINE} s"
            receiving = receiving or asyncio.ensure_future(reader.recv())
            waits = {receiving} if publishing.done() else {receiving, publishing}
            done, _ = await asyncio.wait(waits, timeout=STALL, return_when="FIRST_COMPLETED")
            if not done:
                raise AssertionError(
                    f"the reading client got nothing for {STALL} s after {len(seqs)} messages "
                    "(held up by the client that does not read?)"
                )
            if receiving in done:
                frame = json.loads(receiving.result())
                receiving = None
                if frame["type"] == "message":
                    seqs.append(frame["seq"])
        if receiving is not None:
            receiving.cancel()
        published = await publishing
    assert published == list(range(head + 1, head + len(published) + 1))
    assert seqs == published  # every message, in order, none twice, the last AFTER included
    log = server.process.log_since(offset)
    assert "slow consumer with" in log, log[-3000:]

    # The server let go of the slow client's socket: the 4008 close is behind data the
    # client never read, so the connection is dropped after the grace period.
    local_port = slow.sock.getsockname()[1]
    await asyncio.to_thread(
        servers.wait_until,
        lambda: not owns_connection(server.process.pid, server.port, local_port),
        "the slow client's socket to be dropped",
        backpressure.SLOW_CLOSE_GRACE + 30,
    )
    # What it did get is an unbroken run from the join's head.
    frames, code = await asyncio.to_thread(slow.read_what_came)
    assert code in (4008, None), code
    got = [f["seq"] for f in frames if f["type"] == "message"]
    assert got == list(range(head + 1, head + 1 + len(got)))
    assert len(got) < len(published) - AFTER
    pending = log.split("slow consumer with ")[1].split(" bytes")[0]
    print(
        f"uvicorn slow reader: closed 4008 with {pending} bytes pending; the reader got all "
        f"{len(seqs)} messages, the slow socket {len(got)} before it was dropped"
    )
    server.process.assert_alive()


def names(text: str | bytes, key: str) -> list[str]:
    """The user names of a presence_diff's ``key`` ("joins" or "leaves")."""
    return [user["name"] for user in json.loads(text).get(key, [])]


async def joined(server: DaphneServer, cookie: str) -> Any:
    """A client of ``server`` joined to the lobby, its presence_state read."""
    client = await server.websocket(cookie)
    assert json.loads(await client.recv())["type"] == "hello"
    await client.send(json.dumps({"type": "join", "room": "lobby", "ref": "j"}))
    while json.loads(await client.recv())["type"] != "presence_state":
        pass
    return client


async def test_sigterm_closes_every_websocket_with_1012_and_leaves_presence(stack):
    """uvicorn's own shutdown does what drain.py does under daphne: 1012 to every client
    (resume on another process), and the consumer still leaves the rooms' presence."""
    with stack.another("T") as leaving:
        watcher = await joined(stack.server, login(stack.server, "bob"))
        alice = await joined(leaving, login(leaving, "alice"))
        try:
            while names(await watcher.recv(), "joins") != ["alice"]:
                pass
            # uvicorn ends by raising the signal again once it has shut down.
            assert await asyncio.to_thread(leaving.process.terminate) in (0, -signal.SIGTERM)
            assert "Finished server process" in leaving.process.log()
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(alice.recv(), 10)
            assert alice.close_code == 1012, alice.close_code
            async with asyncio.timeout(10):
                while names(await watcher.recv(), "leaves") != ["alice"]:
                    pass
        finally:
            await alice.close()
            await watcher.close()
        log = leaving.process.log()
        assert tracebacks(log) == [], log[-5000:]
