"""The WebSocket transport: a thin adapter between an ASGI socket and session.Session."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer

from realtime import auth, backpressure, drain, wire
from realtime.conf import conf
from realtime.protocol import CloseCode
from realtime.session import Session

# No alias of that name exists, so channels gives the consumer no channel of its own: all
# broadcasts reach sessions through the per-process hub (broker.py), never per connection.
_NO_LAYER = "realtime.no-per-connection-channel"


logger = logging.getLogger(__name__)


def _closed_errors() -> tuple[type[BaseException], ...]:
    """What the ASGI server raises when the app sends on a socket that has closed."""
    errors: list[type[BaseException]] = [ConnectionError]
    try:
        from autobahn.exception import Disconnected  # daphne's WebSocket implementation
    except ImportError:  # pragma: no cover - another server
        pass
    else:
        errors.append(Disconnected)
    return tuple(errors)


_CLOSED = _closed_errors()


def _socket_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is the server saying the client's socket has closed: one of
    ``_CLOSED``, or uvicorn's ClientDisconnected (matched by name: uvicorn is optional)."""
    return isinstance(exc, _CLOSED) or type(exc).__name__ == "ClientDisconnected"


# Bytes a close frame can take (code and a reason of at most 123 bytes).
_CLOSE_FRAME_BYTES = 129


def _frame_bytes(text: str) -> int:
    """An upper bound of ``text``'s size as a WebSocket frame, without encoding it."""
    return len(text) + 10 if text.isascii() else 4 * len(text) + 10


class RealtimeConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """Speaks protocol v1 over one WebSocket."""

    channel_layer_alias = _NO_LAYER
    session: Session | None = None
    _closing = False
    _slow = False
    _queued: backpressure.Probe | None = None
    _buffer_limit: int = 0  # REALTIME_MAX_BUFFERED_BYTES, read when the socket opens
    _writer: wire.Writer | None = None  # daphne's socket, written directly (wire.py)
    # An asyncio server's transport (uvicorn), and what waits for it: frames (str) and a
    # close (int), each with its size; a task of this connection sends them in order.
    _flow: backpressure.AsyncioFlow | None = None
    _outbox: collections.deque[tuple[str | int, int]] | None = None
    _outbox_bytes = 0
    _flusher: asyncio.Task[None] | None = None
    _drop_timer: asyncio.TimerHandle | None = None
    _close_queued = False  # a close waits in the outbox: later frames are dropped
    _aborting: asyncio.Task[None] | None = None  # a slow client's close, off the hub's path

    _gone = False  # the client's disconnect was received, or the application ended
    _gone_event: asyncio.Event | None = None  # made only when someone waits for that

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # channels' AsyncConsumer.__call__, minus what a consumer without a layer channel
        # never uses: it receives through await_many_dispatch, which creates a task and an
        # asyncio.wait per client frame, and keeps a receive task alive per idle connection.
        self.scope = scope
        self.channel_layer = None
        self.base_send = self._raw_send = send
        self._receive_raw = receive
        self._queued = backpressure.probe(send)
        self._own_task = asyncio.current_task()
        try:
            try:
                while True:
                    await self.dispatch(await self._receive())
            except StopConsumer:
                pass
        except asyncio.CancelledError:
            if not drain.draining():
                raise
            # daphne cancels every application as it shuts down; when that shutdown is a
            # drain, close with 1012 and let the client finish the close handshake first.
            await self._go(CloseCode.RESTARTING)
            await self._await_disconnect()
            raise
        finally:
            drain.unregister(self)
            self._mark_gone()
            self._detach()

    def _detach(self) -> None:
        """Once the socket is done, break the consumer/session cycle (the session's emit and
        close are this consumer's methods), so both are freed at once, not by a full garbage
        collection. A session not closed (an unexpected error) keeps its references."""
        session = self.session
        if session is not None and session.closed:
            session.detach()
            self.session = None
        self._writer = None
        if self._flusher is not None:
            self._flusher.cancel()
        # A pending drop timer stays: the server may still hold the close frame for a client
        # that does not read (it refers to the transport only).
        self._drop_timer = None

    async def _receive(self) -> Any:
        message = await self._receive_raw()
        if message["type"] == "websocket.disconnect":
            self._mark_gone()
        return message

    def _mark_gone(self) -> None:
        self._gone = True
        if self._gone_event is not None:
            self._gone_event.set()

    async def _wait_gone(self) -> None:
        if self._gone:
            return
        if self._gone_event is None:
            self._gone_event = asyncio.Event()
        await self._gone_event.wait()

    async def dispatch(self, message: dict[str, Any]) -> None:
        # channels >= 4.2 hops to a thread (aclose_old_connections) before every handler;
        # our database calls already run through database_sync_to_async, which does that.
        await getattr(self, get_handler_name(message))(message)

    async def connect(self) -> None:
        offered = self.scope.get("subprotocols") or ()
        await self.accept(subprotocol=auth.SUBPROTOCOL if auth.SUBPROTOCOL in offered else None)
        if drain.draining():
            await self.close(code=CloseCode.RESTARTING)
            return
        drain.install()
        drain.register(self)
        # Read once: a settings lookup per written frame cost 4-7 % of fan-out CPU.
        self._buffer_limit = conf.REALTIME_MAX_BUFFERED_BYTES
        self._writer = wire.writer_for(backpressure.find_protocol(self._raw_send))
        if self._writer is None:
            self._flow = backpressure.asyncio_flow(self._raw_send)
        self.session = Session(
            self.scope.get("user"),
            self._emit,
            self._close,
            credentials=auth.credentials_from_scope(self.scope),
            emit_many=self._emit_many,
        )
        await self.session.start()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        assert self.session is not None
        if text_data is None:
            await self.session.receive_binary()
        else:
            await self.session.receive_text(text_data)

    async def disconnect(self, code: int) -> None:
        drain.unregister(self)
        if self.session is not None:
            await self.session.close()

    async def drain(self, code: int) -> None:
        """Close with ``code`` (graceful drain, see drain.py); returns once the client is gone."""
        await self._go(code)
        await self._wait_gone()

    async def _go(self, code: int) -> None:
        if self._closing:
            return
        self._closing = True
        # The close frame first: leaving the rooms may wait on Redis.
        await self._close(int(code))
        if self.session is not None:
            await self.session.close()

    async def _await_disconnect(self) -> None:
        # Bounded: autobahn drops a peer that does not answer the close within its timeout.
        # The disconnect may already have been read (and dropped by the cancelled dispatch
        # loop): receive() noted it in _gone.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain.DRAIN_TIMEOUT):
                while not self._gone:
                    await self._receive()

    async def _emit(self, text: str) -> None:
        if self._slow or self._close_queued:
            return  # closing: the client resumes with after_seq
        writer = self._writer
        pending = writer.write(text) if writer is not None else None
        if pending is None:
            if self._flow is not None:
                pending = await self._send_or_queue(text, self._flow)
            elif not await self._send_now(text) or self._queued is None:
                return
            else:
                pending = self._queued()
        await self._over_limit(pending)

    async def _send_now(self, text: str) -> bool:
        """ASGI ``send``; False if the socket had closed."""
        try:
            await self.send(text_data=text)
        except Exception as exc:
            if not _socket_gone(exc):
                raise
            # The peer went away and the disconnect is not dispatched yet (a broadcast
            # raced it): the frame is dropped, as the client resumes with after_seq.
            logger.debug("realtime: dropped a frame for a closed connection: %r", exc)
            return False
        return True

    async def _send_or_queue(self, text: str, flow: backpressure.AsyncioFlow) -> int:
        """Send ``text`` through an asyncio server without ever waiting for the client.

        Past the transport's high-water mark that server's ``send`` waits until the client
        reads, and a broadcast loop waiting there would hold up every connection of the
        process. Such frames (and every later one, to keep the order) go to the outbox,
        which this connection's own task sends. Returns the bytes not yet taken."""
        if flow.closing():
            return 0  # the server is closing the socket (its keepalive gave up): dropped
        if self._outbox is None and flow.fits(_frame_bytes(text)):
            await self._send_now(text)  # returns at once: writing is not paused
            return flow.buffered()
        self._queue(text, len(text.encode()) + 10)
        return self._pending()

    def _queue(self, item: str | int, size: int) -> None:
        if self._outbox is None:
            self._outbox = collections.deque()
            self._flusher = asyncio.create_task(self._flush())
        self._outbox.append((item, size))
        self._outbox_bytes += size

    async def _flush(self) -> None:
        """Send the outbox in order, each frame once the transport takes it."""
        outbox = self._outbox
        assert outbox is not None
        try:
            while outbox:
                item, size = outbox.popleft()
                self._outbox_bytes -= size
                if isinstance(item, int):
                    await self.close(code=item)  # the last frame: nothing follows a close
                    return
                if not await self._send_now(item):
                    return
        except Exception as exc:
            if not _socket_gone(exc):
                # Frames the server refuses (it closed the socket meanwhile) are dropped: the
                # client resumes with after_seq.
                logger.warning("realtime: stopped sending queued frames: %r", exc)
        finally:
            self._outbox = None
            self._outbox_bytes = 0
            self._flusher = None

    def _pending(self) -> int:
        """Bytes written for this client that it has not taken yet."""
        queued = self._queued() if self._queued is not None else 0
        return queued + self._outbox_bytes

    async def _emit_many(self, texts: Sequence[str]) -> None:
        """The frames of one reply, in one write when the fast path is open."""
        if self._slow:
            return
        writer = self._writer
        pending = writer.write_many(texts) if writer is not None else None
        if pending is None:
            for text in texts:
                await self._emit(text)
            return
        await self._over_limit(pending)

    async def _over_limit(self, pending: int) -> None:
        """Past ``REALTIME_MAX_BUFFERED_BYTES`` queued: wait for the client, or close it."""
        limit = self._buffer_limit
        if pending <= limit or self.session is None:
            return
        # Replies, replays and gap fills run in this connection's own tasks: they may wait
        # for the client to take what is queued (a large replay is not a slow client). The
        # hub's deliveries must never wait (every other connection would), so there a client
        # over the limit has stopped reading: close it (4008) rather than buffer without
        # bound or skip frames. Everything before the close is in order; it resumes with
        # after_seq, and it gets a grace period to read up to the close frame.
        own = asyncio.current_task() is self._own_task or self.session.in_background_fill()
        if own and await self._drained(limit // 2):
            return
        self._slow = True
        logger.warning("realtime: slow consumer with %d bytes pending; closing with 4008", pending)
        backpressure.allow_close_grace(self._raw_send)
        if own:
            await self.session.abort(CloseCode.SLOW_CONSUMER)
        else:
            # Leaving the rooms waits on Redis and presence: not on the hub's delivery loop.
            self._aborting = asyncio.create_task(self._abort_slow(self.session))

    async def _abort_slow(self, session: Session) -> None:
        try:
            await session.abort(CloseCode.SLOW_CONSUMER)
        except Exception as exc:
            if not _socket_gone(exc):
                logger.warning("realtime: closing a slow consumer failed", exc_info=True)

    async def _drained(self, target: int) -> bool:
        """Wait (bounded) until at most ``target`` bytes are queued; False if that never came."""
        assert self._queued is not None
        for _ in range(int(backpressure.DRAIN_WAIT / backpressure.DRAIN_POLL)):
            if self._pending() <= target or self._gone:
                return True
            await asyncio.sleep(backpressure.DRAIN_POLL)
        return False

    async def _close(self, code: int) -> None:
        flow = self._flow
        if flow is None:
            await self.close(code=int(code))
            return
        # Under an asyncio server (uvicorn) closing can wait for the client: on a full
        # transport, and in servers that await the closing handshake. The close is sent from
        # this connection's own task instead, behind what is queued (a slow client gets none
        # of that: it resumes with after_seq). A client that has not read up to it within
        # the grace period is dropped.
        if self._close_queued:
            return
        slow = code == CloseCode.SLOW_CONSUMER
        if slow and self._outbox is not None:
            self._outbox.clear()
            self._outbox_bytes = 0
        full = self._outbox is not None or not flow.fits(_CLOSE_FRAME_BYTES)
        self._close_queued = True
        self._queue(int(code), 0)
        if (full or slow) and self._drop_timer is None:
            loop = asyncio.get_running_loop()
            self._drop_timer = loop.call_later(backpressure.SLOW_CLOSE_GRACE, flow.abort)
