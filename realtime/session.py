"""One client's protocol state machine, shared by every transport.

A transport feeds client text frames to ``receive_text`` and gives the session an ``emit``
coroutine that writes one encoded server frame. The hub (broker.py) calls ``deliver`` with
broadcast frames; the session keeps, per joined room, the last seq it emitted and never emits
out of order: a broadcast ahead of ``last_seq + 1`` is held while the gap is filled from the
database (the channel layer may drop or reorder; the database is the source of truth).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from realtime import auth, broker, metrics, presence, ratelimit, services, writer
from realtime.conf import conf
from realtime.dbthread import Batched, on_db_thread
from realtime.errors import (
    AlreadyJoined,
    Forbidden,
    NotJoined,
    RateLimited,
    RealtimeError,
    Unauthorized,
    Unavailable,
)
from realtime.protocol import (
    PROTOCOL_VERSION,
    ClientType,
    CloseCode,
    ErrorCode,
    Frame,
    FrameError,
    RemovedReason,
    ServerType,
    encode,
    error_frame,
    parse,
    with_ref,
)

logger = logging.getLogger(__name__)

# Joins waiting for their room read at the same time share one thread hop and one query.
_joins: Batched[services.JoinRequest, services.JoinResult] = Batched(
    lambda requests: services.join_many(requests)
)

Emit = Callable[[str], Awaitable[None]]
EmitMany = Callable[[Sequence[str]], Awaitable[None]]
Close = Callable[[int], Awaitable[None]]


async def _dropped_frame(text: str) -> None:
    """The emit of a detached session: its transport is gone."""


async def _dropped_close(code: int) -> None:
    """The close of a detached session: its transport is gone."""


# Broadcasts held for one room while its gap is filled; beyond this the session cannot keep
# up, and closing (the client resumes with after_seq) beats growing without bound.
MAX_PENDING = 10_000

# The clock of the per-connection frame rate; tests replace it to move time.
frame_clock: ratelimit.Clock = time.monotonic


# Frame type -> the Session method handling it (a class-wide table: a dict of bound methods per
# connection would cost memory on every idle connection).
_HANDLERS: dict[ClientType, str] = {
    ClientType.JOIN: "on_join",
    ClientType.LEAVE: "on_leave",
    ClientType.SEND: "on_send",
    ClientType.TYPING: "on_typing",
    ClientType.HISTORY: "on_history",
    ClientType.PING: "on_ping",
}


class RoomMode(Enum):
    JOINING = "joining"  # ack and replay not yet emitted; broadcasts are held
    FILLING = "filling"  # a gap is being read from the database; broadcasts are held
    LIVE = "live"


@dataclass(slots=True)
class RoomState:
    slug: str
    can_send: bool = False
    last_seq: int = 0
    mode: RoomMode = RoomMode.JOINING
    # Sends of this connection awaiting their ack: broadcasts wait so the ack comes first.
    holds: int = 0
    present: bool = False  # counted in the room's presence
    # Frames outside the timeline (presence_diff, retract, typing) that arrive while joining:
    # emitted after the join's replay instead of being lost.
    held: list[str] = field(default_factory=list)
    own_diff: str | None = None  # this connection's own join diff: presence_state says it
    pending: dict[int, str] = field(default_factory=dict)


class Session:
    """The protocol state of one connection (or one SSE / long-poll client)."""

    def __init__(
        self,
        user: Any,
        emit: Emit,
        close: Close,
        *,
        announce_presence: bool = True,
        credentials: auth.Credentials | None = None,
        emit_many: EmitMany | None = None,
    ) -> None:
        self.user = user
        # What the login rests on (auth.py): re-validated every REALTIME_AUTH_RECHECK seconds.
        self.credentials = credentials
        self._frames = ratelimit.MemoryLimiter(lambda: frame_clock())
        # The next re-check of the login: a timer while waiting (a sleeping task per idle
        # connection would cost ~1.4 KB each), a task while it runs.
        self._recheck_timer: asyncio.TimerHandle | None = None
        self._recheck: asyncio.Task[None] | None = None
        # False for clients that re-join on every request (long-poll): they read presence
        # but are not counted in it, so their polls do not make them flicker in and out.
        self.announce_presence = announce_presence
        self._transport_emit = emit
        # Writes the frames of one reply at once (the WebSocket's fast path); else frame by frame.
        self._transport_emit_many = emit_many
        self._close_transport = close
        self.closed = False
        self.rooms: dict[str, RoomState] = {}
        self.conn_id = uuid.uuid4().hex
        self.hub = broker.get_hub()
        self.hub.sessions.add(self)
        metrics.CONNECTIONS.inc()
        self._fills: set[asyncio.Task[None]] = set()

    async def emit(self, text: str) -> None:
        """Write one encoded frame to the transport."""
        metrics.count_out(text)
        await self._transport_emit(text)

    def detach(self) -> None:
        """Forget the transport once it is gone (the session must be closed): its callables
        refer back to it, and that cycle would otherwise wait for a full garbage collection
        (a thousand clients leaving at once made one of 100-140 ms). Frames emitted after
        this are dropped."""
        assert self.closed, "detach() is for a closed session"
        self._transport_emit = _dropped_frame
        self._transport_emit_many = None
        self._close_transport = _dropped_close

    async def emit_many(self, texts: Sequence[str]) -> None:
        """Write the encoded frames of one reply, in order (in one write if the transport can)."""
        for text in texts:
            metrics.count_out(text)
        if self._transport_emit_many is None:
            for text in texts:
                await self._transport_emit(text)
        else:
            await self._transport_emit_many(texts)

    @property
    def authenticated(self) -> bool:
        return self.user is not None and bool(self.user.is_authenticated)

    async def start(self) -> None:
        """Emit ``hello``."""
        await self.emit(
            encode(
                {
                    "type": ServerType.HELLO,
                    "protocol": PROTOCOL_VERSION,
                    "user": services.user_info(self.user),
                    "heartbeat": conf.REALTIME_HEARTBEAT,
                }
            )
        )
        if self.credentials is not None and conf.REALTIME_AUTH_RECHECK > 0:
            self._schedule_recheck()

    async def receive_text(self, text: str) -> None:
        """Handle one client frame; every fault becomes an ``error`` frame."""
        ref: str | None = None
        if not await self._within_frame_rate():
            return
        try:
            frame = parse(text, conf.REALTIME_MAX_PAYLOAD_BYTES)
            ref = frame.ref
            metrics.FRAMES_IN.labels(frame.type).inc()
            await getattr(self, _HANDLERS[frame.type])(frame)
        except FrameError as exc:
            metrics.FRAMES_IN.labels("invalid").inc()
            await self._error(exc.code, exc.message, exc.ref)
        except RealtimeError as exc:
            await self._error(exc.code, exc.message, ref, exc.retry_after)
        except Exception:
            logger.exception("realtime: unexpected error handling a frame")
            await self._error(ErrorCode.INTERNAL, "internal error", ref)

    async def _within_frame_rate(self) -> bool:
        """Count one client frame; over REALTIME_FRAME_RATE it gets ``rate_limited`` (unparsed),
        and a client that keeps going at that pace (a second allowance of refused frames
        used up too) is closed with 4029."""
        rate = ratelimit.parse_rate(conf.REALTIME_FRAME_RATE)
        retry_after = await self._frames.hit("frames", rate)
        if retry_after is None:
            return True
        if await self._frames.hit("refused", rate) is not None:
            logger.warning("realtime: closing a connection that kept flooding (4029)")
            await self.abort(CloseCode.RATE_LIMITED)
            return False
        await self._error(
            ErrorCode.RATE_LIMITED, f"at most {rate} frames", None, _ceil_ms(retry_after)
        )
        return False

    def _schedule_recheck(self) -> None:
        if not self.closed:
            loop = asyncio.get_running_loop()
            self._recheck_timer = loop.call_later(conf.REALTIME_AUTH_RECHECK, self._recheck_due)

    def _recheck_due(self) -> None:
        self._recheck_timer = None
        if not self.closed:
            self._recheck = asyncio.ensure_future(self._recheck_once())

    async def _recheck_once(self) -> None:
        """Re-validate the login and every joined room's rights (every REALTIME_AUTH_RECHECK s)."""
        assert self.credentials is not None
        rooms = [slug for slug, state in self.rooms.items() if state.mode is not RoomMode.JOINING]
        try:
            user, denials = await on_db_thread(_recheck)(self.credentials, rooms)
        except Exception:
            logger.warning("realtime: authorisation re-check failed; retrying", exc_info=True)
            self._schedule_recheck()
            return
        if user is None:
            # Logged out, password changed, deactivated or deleted.
            await self.abort(CloseCode.UNAUTHORIZED)
            return
        self.user = user  # fresh rights (is_staff, is_superuser) for later checks
        for slug, (reason, can_send) in denials.items():
            state = self.rooms.get(slug)
            if state is None:
                continue
            if reason is not None:
                await self.remove(slug, reason)
            else:
                state.can_send = can_send
        self._schedule_recheck()

    async def _error(
        self, code: str, message: str, ref: str | None, retry_after: float | None = None
    ) -> None:
        metrics.ERRORS.labels(code).inc()
        await self.emit(error_frame(code, message, ref, retry_after))

    async def receive_binary(self) -> None:
        """Binary frames are not part of protocol v1."""
        metrics.FRAMES_IN.labels("binary").inc()
        if not await self._within_frame_rate():
            return
        await self._error(ErrorCode.BAD_FRAME, "binary frames are not supported", None)

    async def close(self) -> None:
        """Leave every room and stop background work; call when the transport closes."""
        if not self.closed:
            metrics.CONNECTIONS.dec()
        self.closed = True
        self.hub.sessions.discard(self)
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
            self._recheck_timer = None
        if self._recheck is not None and self._recheck is not asyncio.current_task():
            self._recheck.cancel()
        for task in list(self._fills):
            # Not the calling task (a failed gap fill aborts from its own task): cancelled,
            # it would stop at the first wait below and never close the transport.
            if task is not asyncio.current_task():
                task.cancel()
        for slug in list(self.rooms):
            await self._leave_room(slug)

    async def _leave_room(self, slug: str) -> None:
        state = self.rooms.pop(slug, None)
        await self.hub.unsubscribe(slug, self)
        if state is not None and state.present:
            try:
                # Waits for a held diff too: a process that stops must not lose the leave.
                await presence.announce(
                    slug, await presence.get_backend().leave(slug, self.conn_id), wait=True
                )
            except Exception:
                # The heartbeat TTL removes the entry anyway.
                logger.warning("realtime: presence leave failed for %s", slug, exc_info=True)

    def presence_user(self, room: str) -> dict[str, Any] | None:
        """This connection's presence entry in ``room``, if it counts there."""
        state = self.rooms.get(room)
        if state is None or not state.present:
            return None
        return services.user_info(self.user)

    async def _enter_presence(self, state: RoomState) -> list[dict[str, Any]]:
        """Count this connection in the room's presence; return the room's users."""
        user = services.user_info(self.user)
        try:
            backend = presence.get_backend()
            if user is not None and self.announce_presence:
                presence.ensure_keeper(self.hub)
                # Present even if the join below fails: the heartbeat then counts it again.
                state.present = True
                change, users = await backend.enter(state.slug, self.conn_id, user)
                state.own_diff = await presence.announce(state.slug, change)
                return users
            return await backend.users(state.slug)
        except Exception:
            # Presence is advisory: a join still works without it (the heartbeat retries).
            logger.warning("realtime: presence join failed for %s", state.slug, exc_info=True)
            return []

    # -- client frames -------------------------------------------------------------------

    async def on_join(self, frame: Frame) -> None:
        assert frame.room is not None
        slug = frame.room
        if slug in self.rooms:
            raise AlreadyJoined(f"already joined {slug!r}")
        state = self.rooms[slug] = RoomState(slug)
        try:
            # Subscribe before reading the head, so no broadcast after the head is missed.
            await self.hub.subscribe(slug, self)
            result = await _joins((slug, self.user, frame.after_seq, frame.epoch))
        except BaseException as exc:
            if self.rooms.get(slug) is state:
                del self.rooms[slug]
            await self.hub.unsubscribe(slug, self)
            if isinstance(exc, Exception) and not isinstance(exc, RealtimeError):
                logger.warning("realtime: join of %s failed", slug, exc_info=True)
                raise Unavailable() from exc
            raise
        ack = {
            "type": ServerType.ACK,
            "room": slug,
            "seq": result.head,
            "epoch": result.epoch,
            "recovered": result.recovered,
        }
        users = await self._enter_presence(state)
        state_frame = {"type": ServerType.PRESENCE_STATE, "room": slug, "users": users}
        await self.emit_many((encode(with_ref(ack, frame.ref)), encode(state_frame)))
        for message in result.messages:
            await self.emit(services.message_frame(message))
        state.last_seq = result.head
        state.can_send = result.can_send
        metrics.JOINS.inc()
        await self._drain_or_abort(state)
        held, state.held = state.held, []
        for frame_text in held:
            if frame_text == state.own_diff:
                state.own_diff = None
                continue
            await self.emit(frame_text)

    async def on_leave(self, frame: Frame) -> None:
        assert frame.room is not None
        if frame.room not in self.rooms:
            raise NotJoined(f"not joined to {frame.room!r}")
        await self._leave_room(frame.room)
        await self.emit(encode(with_ref({"type": ServerType.ACK, "room": frame.room}, frame.ref)))

    async def on_send(self, frame: Frame) -> None:
        assert frame.room is not None and frame.payload is not None
        state = self.rooms.get(frame.room)
        if state is None:
            raise NotJoined(f"join {frame.room!r} before sending")
        if not self.authenticated:
            raise Unauthorized()
        await self._limit(f"send:{self.user.pk}", conf.REALTIME_SEND_RATE, "messages")
        state.holds += 1
        started = time.perf_counter()
        try:
            result = await _guarded(
                writer.append(frame.room, self.user, frame.payload, frame.client_msg_id),
                "writer.append",
            )
            message = result.message
            # A retry (same client_msg_id) broadcasts again: the first attempt may have been
            # stored but never broadcast, and sessions drop a seq they have already emitted.
            try:
                await broker.publish_message(
                    frame.room, message["seq"], services.message_frame(message)
                )
            except Exception as exc:
                # Stored, but nobody was told: no ack. A retry with the same client_msg_id
                # returns this message; the others get it by gap fill or replay meanwhile.
                logger.warning("realtime: broadcast of %s#%s failed", frame.room, message["seq"])
                raise Unavailable("could not broadcast; retry with the same client_msg_id") from exc
            metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
            ack = {
                "type": ServerType.ACK,
                "room": frame.room,
                "seq": message["seq"],
                "id": message["id"],
            }
            await self.emit(encode(with_ref(ack, frame.ref)))
        finally:
            state.holds -= 1
            held = state.pending and state.mode is RoomMode.LIVE and not state.holds
            if held and self.rooms.get(frame.room) is state:
                self._start_fill(state)

    async def on_typing(self, frame: Frame) -> None:
        assert frame.room is not None
        state = self.rooms.get(frame.room)
        if state is None:
            raise NotJoined(f"join {frame.room!r} before typing")
        if not self.authenticated:
            raise Unauthorized()
        if not state.can_send:
            raise Forbidden("you may not post in this room")
        await self._limit(f"typing:{self.user.pk}", conf.REALTIME_TYPING_RATE, "typing frames")
        sender = services.user_info(self.user)
        typing = encode({"type": ServerType.TYPING, "room": frame.room, "sender": sender})
        try:
            await broker.publish_ephemeral(frame.room, typing, exclude_user=self.user.pk)
        except Exception as exc:
            raise Unavailable() from exc

    async def _limit(self, key: str, rate_text: str, what: str) -> None:
        """Count one event of ``key`` against a shared (Redis) rate; RateLimited when over."""
        rate = ratelimit.parse_rate(rate_text)
        try:
            retry_after = await ratelimit.get_limiter().hit(key, rate)
        except Exception as exc:
            raise Unavailable() from exc
        if retry_after is not None:
            raise RateLimited(f"at most {rate} {what}", retry_after=_ceil_ms(retry_after))

    async def on_history(self, frame: Frame) -> None:
        assert frame.room is not None
        messages = await self._db(
            services.history, frame.room, self.user, frame.before_seq, frame.limit
        )
        ack = {"type": ServerType.ACK, "room": frame.room, "messages": messages}
        await self.emit(encode(with_ref(ack, frame.ref)))

    async def on_ping(self, frame: Frame) -> None:
        await self.emit(encode(with_ref({"type": ServerType.PONG}, frame.ref)))

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await _guarded(on_db_thread(fn)(*args), fn.__name__)

    # -- broadcasts from the hub ---------------------------------------------------------

    async def deliver(self, room: str, seq: int, frame: str) -> bool:
        """Take one broadcast message frame; emits it only in seq order.

        True when it was written at once: the hub then counts it in the metrics (once per
        broadcast, not per connection)."""
        state = self.rooms.get(room)
        if state is None or seq <= state.last_seq:
            return False
        live = state.mode is RoomMode.LIVE and not state.holds
        if live and seq == state.last_seq + 1:
            state.last_seq = seq
            await self._transport_emit(frame)
            return True
        if len(state.pending) >= MAX_PENDING:
            await self.abort(CloseCode.SLOW_CONSUMER)
            return False
        state.pending[seq] = frame
        if live:
            # Ahead of last_seq + 1: the layer dropped or reordered something.
            self._start_fill(state)
        return False

    async def control(self, room: str, message: dict[str, Any]) -> None:
        """Act on a moderation control for ``room`` (see moderation.py)."""
        state = self.rooms.get(room)
        if state is None:
            return
        user_ids = message.get("user_ids")  # None: everybody in the room
        if user_ids is not None and (not self.authenticated or self.user.pk not in user_ids):
            return
        if message["op"] == "kick":
            await self.remove(room, RemovedReason.KICKED)
            return
        reason, can_send = await self._db(services.denial, room, self.user)
        if reason is not None:
            await self.remove(room, reason)
        elif self.rooms.get(room) is state:
            state.can_send = can_send

    async def remove(self, room: str, reason: str) -> None:
        """Take this connection out of ``room`` and tell the client why."""
        if room not in self.rooms:
            return
        await self._leave_room(room)
        await self.emit(encode({"type": ServerType.REMOVED, "room": room, "reason": reason}))

    async def deliver_ephemeral(self, room: str, frame: str, exclude_user: Any) -> None:
        """Take one broadcast frame outside the timeline (typing)."""
        state = self.rooms.get(room)
        if state is None:
            return
        if exclude_user is not None and self.authenticated and self.user.pk == exclude_user:
            return
        if state.mode is RoomMode.JOINING:
            if len(state.held) < MAX_PENDING:
                state.held.append(frame)
            return
        await self.emit(frame)

    def in_background_fill(self) -> bool:
        """True when called from one of this session's gap-fill tasks."""
        return asyncio.current_task() in self._fills

    def _start_fill(self, state: RoomState) -> None:
        state.mode = RoomMode.FILLING
        task = asyncio.create_task(self._fill(state))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill(self, state: RoomState) -> None:
        await self._drain_or_abort(state)

    async def _drain_or_abort(self, state: RoomState) -> None:
        try:
            await self._drain(state)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Without the gap the guarantee cannot hold: close, and the client resumes with
            # after_seq (from the database) rather than see a hole.
            logger.warning("realtime: gap fill for %s failed; closing", state.slug, exc_info=True)
            await self.abort(CloseCode.INTERNAL)

    async def abort(self, code: int) -> None:
        """Close the transport with ``code`` (once) and leave every room."""
        if self.closed:
            return
        if code == CloseCode.SLOW_CONSUMER:
            metrics.SLOW_CONSUMER_CLOSES.inc()
        await self.close()
        await self._close_transport(code)

    async def _drain(self, state: RoomState) -> None:
        """Emit held broadcasts in order, reading any gap from the database; then go live."""
        state.mode = RoomMode.FILLING
        while self.rooms.get(state.slug) is state:
            for seq in sorted(state.pending):
                if seq <= state.last_seq:
                    del state.pending[seq]
                elif seq == state.last_seq + 1:
                    frame = state.pending.pop(seq)
                    state.last_seq = seq
                    await self.emit(frame)
                else:
                    break
            if not state.pending:
                state.mode = RoomMode.LIVE
                return
            upto = min(state.pending) - 1
            upto = min(upto, state.last_seq + conf.REALTIME_GAP_FILL_BATCH)
            # Every local session that missed the same broadcasts asks for the same range:
            # one read (and one encoding) per process, not one per session.
            key = ("gap", state.slug, state.last_seq, upto)
            read = functools.partial(_missed_frames, state.slug, state.last_seq, upto)
            missed = await _guarded(self.hub.shared(key, read), "messages_between")
            for seq, frame in missed:
                if seq > state.last_seq:
                    state.last_seq = seq
                    await self.emit(frame)
            # Seqs absent from the database were deleted: nothing to wait for.
            state.last_seq = max(state.last_seq, upto)


async def _missed_frames(slug: str, after_seq: int, upto_seq: int) -> list[tuple[int, str]]:
    """(seq, message frame) of the room's messages with after_seq < seq <= upto_seq."""
    metrics.GAP_FILLS.inc()
    messages = await on_db_thread(services.messages_between)(slug, after_seq, upto_seq)
    return [(message["seq"], services.message_frame(message)) for message in messages]


async def _guarded(call: Awaitable[Any], what: str) -> Any:
    """Await a database call; a failure other than a refusal becomes ``unavailable``."""
    try:
        return await call
    except RealtimeError:
        raise
    except Exception as exc:
        logger.warning("realtime: database call %s failed", what, exc_info=True)
        raise Unavailable() from exc


def _ceil_ms(seconds: float) -> float:
    """``seconds`` rounded up to the millisecond: a retry_after never reads 0."""
    return math.ceil(seconds * 1000) / 1000


def _recheck(
    credentials: auth.Credentials, rooms: list[str]
) -> tuple[Any, dict[str, tuple[str | None, bool]]]:
    """(the user if still logged in, else None; each room's removal reason and send right)."""
    user = auth.still_valid(credentials)
    if user is None:
        return None, {}
    return user, {slug: services.denial(slug, user) for slug in rooms}
