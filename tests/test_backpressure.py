"""Slow clients under an asyncio ASGI server (uvicorn): the consumer's outbox.

uvicorn's ASGI ``send`` waits while its transport is past the high-water mark, so a broadcast
loop that awaited it for a client that stopped reading would hold up every connection of the
process. These tests drive ``RealtimeConsumer``'s emit and close paths over a transport that
pauses and resumes writing as asyncio's do; tests/test_uvicorn.py runs the real server.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from uvicorn.protocols.utils import ClientDisconnected

from realtime import backpressure, wire
from realtime.consumers import RealtimeConsumer
from realtime.protocol import CloseCode

LOW, HIGH = 100, 400
DEADLINE = 5.0


class Transport:
    """An asyncio write transport: pauses its protocol past HIGH, resumes it at LOW."""

    def __init__(self, protocol: Server) -> None:
        self.protocol = protocol
        self.buffer = bytearray()
        self.paused = False
        self.aborted = False
        self.closed = False

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW, HIGH

    def write(self, data: bytes) -> None:
        assert not self.aborted
        self.buffer += data
        if not self.paused and len(self.buffer) > HIGH:
            self.paused = True
            self.protocol.writable.clear()

    def take(self) -> bytes:
        """The client reads everything buffered."""
        data, self.buffer = bytes(self.buffer), bytearray()
        if self.paused:
            self.paused = False
            self.protocol.writable.set()
        return data

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def close(self) -> None:  # what uvicorn does when its keepalive pings go unanswered
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.protocol.disconnected = True
        self.protocol.writable.set()


class Server:
    """Like uvicorn's websockets-sansio protocol: ``send`` waits while writing is paused."""

    def __init__(self) -> None:
        self.transport = Transport(self)
        self.writable = asyncio.Event()
        self.writable.set()
        self.disconnected = False
        self.close_sent = False
        self.received: list[str] = []  # what the client has read, in order

    async def send(self, message: dict) -> None:
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if self.close_sent:
            raise RuntimeError(f"Unexpected ASGI message {message['type']!r} after the close")
        if message["type"] == "websocket.send":
            self.transport.write(message["text"].encode() + b"\n")
        else:
            assert message["type"] == "websocket.close", message
            self.transport.write(b"close %d\n" % message["code"])
            self.close_sent = True

    def read(self) -> list[str]:
        self.received += self.transport.take().decode().splitlines()
        return self.received


class SessionStub:
    """What the consumer's slow-client path needs of a session."""

    def __init__(self, consumer: RealtimeConsumer) -> None:
        self.consumer = consumer
        self.closed_with: int | None = None

    def in_background_fill(self) -> bool:
        return False

    async def abort(self, code: int) -> None:
        self.closed_with = code
        await self.consumer._close(code)


class Wrapper:  # channels' session middleware keeps the server's send as real_send
    def __init__(self, send):
        self.real_send = send

    async def send(self, message):
        await self.real_send(message)


def consumer_on(server: Server, limit: int = 10_000) -> RealtimeConsumer:
    consumer = RealtimeConsumer()
    send = Wrapper(server.send).send
    consumer.base_send = consumer._raw_send = send
    consumer._queued = backpressure.probe(send)
    consumer._flow = backpressure.asyncio_flow(send)
    consumer._buffer_limit = limit
    consumer._own_task = None  # emits come from the hub's loop unless a test says otherwise
    consumer.session = SessionStub(consumer)  # type: ignore[assignment]
    return consumer


def frame(i: int) -> str:
    return f"m{i:03d}" + "x" * 46  # 50 characters


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def fill(consumer: RealtimeConsumer, server: Server) -> int:
    """Emit frames until they queue and the consumer's own task has filled the transport
    past its high-water mark; how many."""
    n = 0
    while consumer._outbox is None:
        await consumer._emit(frame(n))
        n += 1
        assert n < 100
    while not server.transport.paused:
        await consumer._emit(frame(n))
        n += 1
        assert n < 100
        await asyncio.sleep(0)  # the outbox task writes what fits
    return n


async def backed_up() -> tuple[Server, RealtimeConsumer, int]:
    """A server whose transport is full and a consumer with frames queued; how many sent."""
    server = Server()
    consumer = consumer_on(server)
    sent = await fill(consumer, server)
    await consumer._emit(frame(sent))
    return server, consumer, sent + 1


def at_once(coroutine) -> None:
    """Run ``coroutine`` and check that it finished without ever waiting."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise AssertionError("it waited")


async def broadcast_until_closed() -> tuple[Server, RealtimeConsumer, int]:
    """Broadcast to a client that reads nothing until it is closed as slow (limit 2,000
    bytes); each delivery returns without waiting. The server, the consumer and the frames
    broadcast."""
    server = Server()
    consumer = consumer_on(server, limit=2_000)
    n = 0
    while not consumer._slow:
        at_once(consumer._emit(frame(n)))
        n += 1
        assert n < 200
        await asyncio.sleep(0)  # the outbox task writes what fits
    await until(lambda: consumer.session.closed_with is not None, "the slow client's close")
    return server, consumer, n


def test_the_probes_find_an_asyncio_transport_behind_wrappers():
    server = Server()
    send = Wrapper(server.send).send
    server.transport.write(b"y" * 42)
    probe = backpressure.probe(send)
    assert probe is not None and probe() == 42
    flow = backpressure.asyncio_flow(send)
    assert flow is not None and flow.buffered() == 42
    assert flow.fits(HIGH - 42) and not flow.fits(HIGH - 41)
    assert wire.writer_for(backpressure.find_protocol(send)) is None  # daphne's fast path only
    backpressure.allow_close_grace(send, 9)  # autobahn's setting: nothing to set here
    assert not hasattr(server, "closeHandshakeTimeout")

    async def plain(message):
        pass

    assert backpressure.asyncio_flow(plain) is None


def test_a_paused_transport_takes_nothing_until_it_is_back_at_the_low_water_mark():
    server = Server()
    flow = backpressure.AsyncioFlow(object(), server.transport)  # type: ignore[arg-type]
    server.transport.write(b"y" * (HIGH + 1))
    server.transport.buffer = server.transport.buffer[: LOW + 1]  # read down, still paused
    assert not flow.fits(1)
    server.transport.buffer = server.transport.buffer[:LOW]
    assert flow.fits(HIGH - LOW)


async def test_a_paused_writable_event_is_heeded_whatever_the_buffer_says():
    """uvloop counts what libuv wrote in part without resuming the protocol: the buffer can
    read below the low-water mark while uvicorn's ``writable`` is still cleared."""
    server = Server()
    consumer = consumer_on(server)
    server.writable.clear()  # paused, with an empty buffer
    assert not consumer._flow.fits(1)
    for i in range(3):
        at_once(consumer._emit(frame(i)))  # queued, not waited for
    assert consumer._outbox is not None and server.read() == []
    server.writable.set()  # resumed
    await until(lambda: server.read() == [frame(i) for i in range(3)], "the queued frames")


async def test_a_full_transport_never_holds_up_the_broadcast_loop():
    server = Server()
    consumer = consumer_on(server)
    sent = await fill(consumer, server)
    for i in range(sent, sent + 20):
        at_once(consumer._emit(frame(i)))  # the hub's delivery does not wait for the client
    assert consumer._pending() >= 20 * 51
    await until(lambda: len(server.read()) == sent + 20, "every frame")
    assert server.received == [frame(i) for i in range(sent + 20)]  # in order, none lost
    await until(lambda: consumer._outbox is None, "the outbox to empty")
    assert consumer._pending() == 0
    await consumer._emit(frame(999))  # straight through again
    assert server.read()[-1] == frame(999)
    assert consumer.session.closed_with is None


async def test_a_close_goes_out_behind_the_queued_frames_without_waiting():
    server, consumer, sent = await backed_up()
    at_once(consumer._close(CloseCode.UNAUTHORIZED))
    at_once(consumer._emit(frame(sent)))  # after the close: dropped, not sent after it
    await until(lambda: server.read()[-1:] == ["close 4001"], "the close")
    await until(lambda: consumer._outbox is None, "the outbox to end")
    assert server.received == [*(frame(i) for i in range(sent)), "close 4001"]
    # Closed on a full transport: had the client stopped reading, it would be dropped.
    assert consumer._drop_timer is not None
    consumer._drop_timer.cancel()


async def test_a_client_over_the_limit_is_closed_4008_and_dropped_if_it_never_reads(
    monkeypatch,
):
    monkeypatch.setattr(backpressure, "SLOW_CLOSE_GRACE", 0.2)
    server, consumer, n = await broadcast_until_closed()
    assert consumer.session.closed_with == CloseCode.SLOW_CONSUMER
    await consumer._emit(frame(n))  # dropped: the client resumes with after_seq
    await until(lambda: server.transport.aborted, "the drop after the grace period")
    await until(lambda: consumer._outbox is None, "the outbox to end")
    # What the client got is an unbroken prefix; the close never reached it.
    got = server.read()
    assert got == [frame(i) for i in range(len(got))] and len(got) < n


async def test_a_slow_client_that_reads_gets_everything_before_4008_then_the_close(
    monkeypatch,
):
    monkeypatch.setattr(backpressure, "SLOW_CLOSE_GRACE", 30.0)
    server, _consumer, _n = await broadcast_until_closed()
    await until(lambda: server.read()[-1:] == ["close 4008"], "the close")
    body = server.received[:-1]
    assert body == [frame(i) for i in range(len(body))]  # in order, nothing after the close
    assert not server.transport.aborted


async def test_a_reply_over_the_limit_waits_for_the_client_instead_of_closing():
    server = Server()
    consumer = consumer_on(server, limit=2_000)
    consumer._own_task = asyncio.current_task()  # a reply: this connection's own work

    async def reader():
        while True:
            await asyncio.sleep(0.02)
            server.read()

    reading = asyncio.create_task(reader())
    try:
        for i in range(100):  # 5,100 bytes: twice past the limit
            await consumer._emit(frame(i))  # waits (bounded by DRAIN_WAIT) while over the limit
        await until(lambda: len(server.read()) == 100, "every frame")
    finally:
        reading.cancel()
    assert server.received == [frame(i) for i in range(100)]
    assert consumer.session.closed_with is None


async def test_a_client_gone_while_frames_wait_ends_the_outbox_quietly():
    server, consumer, _sent = await backed_up()
    server.transport.abort()
    await until(lambda: consumer._outbox is None, "the outbox to end")
    with pytest.raises(ClientDisconnected):
        await server.send({"type": "websocket.send", "text": "x"})


async def test_a_close_waiting_on_a_full_transport_ends_quietly_if_the_client_goes():
    server = Server()
    consumer = consumer_on(server)
    server.transport.write(b"y" * (HIGH + 1))  # full: the close cannot go out yet
    at_once(consumer._close(CloseCode.UNAUTHORIZED))
    flusher = consumer._flusher
    assert flusher is not None and not flusher.done()
    server.transport.abort()
    await asyncio.wait_for(flusher, DEADLINE)  # no ClientDisconnected out of the task
    assert server.read() == ["y" * (HIGH + 1)]


async def test_frames_for_a_socket_the_server_is_closing_are_dropped():
    server = Server()
    consumer = consumer_on(server)
    at_once(consumer._emit(frame(0)))
    server.close_sent = True  # uvicorn gave up on the keepalive: close sent, socket closing
    server.transport.close()
    at_once(consumer._emit(frame(1)))  # dropped, no RuntimeError for the hub to log
    assert server.read() == [frame(0)] and consumer._outbox is None
