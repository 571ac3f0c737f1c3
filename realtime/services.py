"""The only module that reads and writes realtime's tables.

Everything here is synchronous ORM code; async callers wrap it in database_sync_to_async.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.db.models import F

from realtime import metrics
from realtime.conf import conf
from realtime.errors import Forbidden, RoomNotFound, Unauthorized
from realtime.models import Membership, Message, Room
from realtime.protocol import RemovedReason, ServerType, encode

AnyUser = AbstractBaseUser | AnonymousUser


def user_info(user: Any) -> dict[str, Any] | None:
    """The ``{id, name}`` a frame shows for a user, or None for anonymous/server."""
    if user is None or not user.is_authenticated:
        return None
    pk = user.pk
    name = (getattr(user, "get_full_name", lambda: "")() or user.get_username()).strip()
    return {"id": pk if isinstance(pk, int) else str(pk), "name": name}


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def message_dict(message: Message, room_slug: str) -> dict[str, Any]:
    """A message as it appears in ``message`` frames, history and replays."""
    data: dict[str, Any] = {"room": room_slug, "seq": message.seq, "id": message.pk}
    if message.retracted:
        data.update(sender=None, payload=None, retracted=True)
    else:
        data.update(sender=user_info(message.sender), payload=message.payload)
    data["sent_at"] = _iso(message.created_at)
    return data


def message_frame(message: dict[str, Any]) -> str:
    """Encode a ``message`` frame from a message_dict."""
    return encode({"type": ServerType.MESSAGE, **message})


def get_room(slug: str) -> Room:
    try:
        return Room.objects.get(slug=slug)
    except Room.DoesNotExist:
        raise RoomNotFound(f"room {slug!r} does not exist") from None


def _membership(room: Room, user: Any) -> Membership | None:
    return Membership.objects.filter(room=room, user=user).first()


def authorize(room: Room, user: Any, *, send: bool) -> None:
    """Raise unless ``user`` may read (or, with send=True, post to) ``room``."""
    authenticated = user is not None and user.is_authenticated
    if room.archived:
        raise Forbidden("room is archived")
    if not authenticated:
        if not send and room.kind != Room.Kind.PRIVATE and conf.REALTIME_ALLOW_ANONYMOUS_READ:
            return
        raise Unauthorized()
    if user.is_superuser:
        return
    membership = _membership(room, user)
    if membership is not None and membership.banned:
        raise Forbidden("you are banned from this room")
    if room.kind == Room.Kind.PRIVATE and membership is None:
        raise Forbidden("this room is for members only")
    if send and room.kind == Room.Kind.ANNOUNCE:
        is_moderator = membership is not None and membership.role == Membership.Role.MODERATOR
        if not (user.is_staff or is_moderator):
            raise Forbidden("only staff and moderators post in this room")


def is_allowed(room: Room, user: Any, *, send: bool = False) -> bool:
    """True when ``user`` may join (or, with send=True, post to) ``room``."""
    try:
        authorize(room, user, send=send)
    except (Forbidden, Unauthorized):
        return False
    return True


def denial(slug: str, user: Any) -> tuple[str | None, bool]:
    """Why ``user`` may no longer read the room (a removed reason, or None), and can they send."""
    try:
        room = get_room(slug)
    except RoomNotFound:
        return RemovedReason.FORBIDDEN, False
    try:
        authorize(room, user, send=False)
    except (Forbidden, Unauthorized):
        if room.archived:
            return RemovedReason.ARCHIVED, False
        membership = _membership(room, user) if user is not None and user.is_authenticated else None
        if membership is not None and membership.banned:
            return RemovedReason.BANNED, False
        return RemovedReason.FORBIDDEN, False
    return None, is_allowed(room, user, send=True)


def retract(message_ids: list[int]) -> list[tuple[str, int]]:
    """Turn messages into tombstones (seqs stay contiguous); returns (room, seq) of each."""
    rows = list(Message.objects.filter(pk__in=message_ids, retracted=False).select_related("room"))
    Message.objects.filter(pk__in=[m.pk for m in rows]).update(retracted=True)
    return [(m.room.slug, m.seq) for m in rows]


def can_read(room: Room, user: Any) -> bool:
    """True when ``user`` may join ``room``."""
    return is_allowed(room, user)


@dataclass
class JoinResult:
    room: str
    head: int
    epoch: int
    recovered: bool
    can_send: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)


def join(slug: str, user: Any, after_seq: int | None, epoch: int | None) -> JoinResult:
    """Authorise a join and collect the replay a reconnecting client missed."""
    room = get_room(slug)
    authorize(room, user, send=False)
    head = room.head_seq
    result = JoinResult(
        room=slug,
        head=head,
        epoch=room.epoch,
        recovered=False,
        can_send=is_allowed(room, user, send=True),
    )
    if after_seq is None:
        return result
    same_epoch = epoch is None or epoch == room.epoch
    if same_epoch and after_seq <= head and head - after_seq <= conf.REALTIME_RECOVERY_LIMIT:
        result.recovered = True
        result.messages = messages_between(room, after_seq, head)
    return result


def messages_between(room: Room | str, after_seq: int, upto_seq: int) -> list[dict[str, Any]]:
    """Messages with after_seq < seq <= upto_seq, ascending (deleted rows simply absent)."""
    slug = room if isinstance(room, str) else room.slug
    rows = (
        Message.objects.filter(room__slug=slug, seq__gt=after_seq, seq__lte=upto_seq)
        .select_related("sender")
        .order_by("seq")
    )
    return [message_dict(m, slug) for m in rows]


def history(
    slug: str, user: Any, before_seq: int | None, limit: int, after_seq: int | None = None
) -> list[dict[str, Any]]:
    """Up to ``limit`` messages, ascending: the newest before ``before_seq`` (default: the
    newest of all), or with ``after_seq`` the oldest after it (still below ``before_seq``)."""
    room = get_room(slug)
    authorize(room, user, send=False)
    rows = Message.objects.filter(room=room).select_related("sender")
    if before_seq is not None:
        rows = rows.filter(seq__lt=before_seq)
    if after_seq is not None:
        oldest_first = rows.filter(seq__gt=after_seq).order_by("seq")[:limit]
        return [message_dict(m, slug) for m in oldest_first]
    newest_first = list(rows.order_by("-seq")[:limit])
    return [message_dict(m, slug) for m in reversed(newest_first)]


class _Duplicate(Exception):
    def __init__(self, message: Message) -> None:
        self.message = message


@dataclass
class AppendResult:
    message: dict[str, Any]
    created: bool


def append_message(
    slug: str, user: Any, payload: dict[str, Any], client_msg_id: str | None = None
) -> AppendResult:
    """Authorise and persist one message, allocating the room's next seq atomically.

    The increment of ``Room.head_seq`` is the transaction's first statement, so the row (or,
    on SQLite, the database) is write-locked before anything is read: two processes can never
    allocate the same seq, and a rolled-back transaction gives its seq back (no hole).
    """
    sender = user if user is not None and user.is_authenticated else None
    try:
        with transaction.atomic():
            if not Room.objects.filter(slug=slug).update(head_seq=F("head_seq") + 1):
                raise RoomNotFound(f"room {slug!r} does not exist")
            room = Room.objects.get(slug=slug)
            if user is not None:
                authorize(room, user, send=True)
            if client_msg_id is not None and sender is not None:
                existing = (
                    Message.objects.filter(room=room, sender=sender, client_msg_id=client_msg_id)
                    .select_related("sender")
                    .first()
                )
                if existing is not None:
                    raise _Duplicate(existing)  # rolls the increment back
            message = Message.objects.create(
                room=room,
                seq=room.head_seq,
                sender=sender,
                payload=payload,
                client_msg_id=client_msg_id,
            )
    except _Duplicate as dup:
        return AppendResult(message_dict(dup.message, slug), created=False)
    metrics.MESSAGES_PERSISTED.inc()
    return AppendResult(message_dict(message, slug), created=True)
