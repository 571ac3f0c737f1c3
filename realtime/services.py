"""The only module that reads and writes realtime's tables.

Everything here is synchronous ORM code; async callers wrap it in database_sync_to_async.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection, connections, router, transaction
from django.db.models import F

from realtime import metrics, pgbatch, rawread
from realtime.conf import conf
from realtime.errors import Forbidden, RealtimeError, RoomNotFound, Unauthorized
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
    # A slice, not first(): first() orders by the primary key, and PostgreSQL may then walk
    # the primary key index instead of using the (room, user) unique index.
    return next(iter(Membership.objects.filter(room=room, user=user).order_by()[:1]), None)


_LOOKUP: Any = object()  # authorize(): read the membership from the database


def authorize(room: Room, user: Any, *, send: bool, membership: Any = _LOOKUP) -> None:
    """Raise unless ``user`` may read (or, with send=True, post to) ``room``.

    ``membership``: the user's Membership of the room (or None), when the caller has it."""
    authenticated = user is not None and user.is_authenticated
    if room.archived:
        raise Forbidden("room is archived")
    if not authenticated:
        if not send and room.kind != Room.Kind.PRIVATE and conf.REALTIME_ALLOW_ANONYMOUS_READ:
            return
        raise Unauthorized()
    if user.is_superuser:
        return
    if membership is _LOOKUP:
        membership = _membership(room, user)
    if membership is not None and membership.banned:
        raise Forbidden("you are banned from this room")
    if room.kind == Room.Kind.PRIVATE and membership is None:
        raise Forbidden("this room is for members only")
    if send and room.kind == Room.Kind.ANNOUNCE:
        is_moderator = membership is not None and membership.role == Membership.Role.MODERATOR
        if not (user.is_staff or is_moderator):
            raise Forbidden("only staff and moderators post in this room")


def is_allowed(room: Room, user: Any, *, send: bool = False, membership: Any = _LOOKUP) -> bool:
    """True when ``user`` may join (or, with send=True, post to) ``room``."""
    try:
        authorize(room, user, send=send, membership=membership)
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


_ROOM = rawread.Columns(Room, "r")
_MEMBERSHIP = rawread.Columns(Membership, "m", ["id", "role", "banned", "created_at"])
_MEMBER_USER: Any = Membership._meta.get_field("user")
_ROOM_SLUG = _ROOM.attnames.index("slug")  # a plain text column: no conversion to compare
_JOIN_SQL: dict[tuple[str, int, int], str] = {}  # per database alias and IN list sizes


def _join_sql(db: Any, slugs: int, users: int) -> str:
    """Rooms by slug, each LEFT JOINed to the memberships of the given users: one row per
    (room, member among the users), or one with NULLs when none of them is a member."""
    key = (db.alias, slugs, users)
    sql = _JOIN_SQL.get(key)
    if sql is None:
        sql = _JOIN_SQL[key] = (
            f"SELECT {_ROOM.select(db)}, {_MEMBERSHIP.column(db, 'user')}, {_MEMBERSHIP.select(db)}"
            f" FROM {_ROOM.table(db)} LEFT OUTER JOIN {_MEMBERSHIP.table(db)}"
            f" ON ({_MEMBERSHIP.column(db, 'room')} = {_ROOM.column(db, 'id')}"
            f" AND {_MEMBERSHIP.column(db, 'user')} IN ({rawread.placeholders(users)}))"
            f" WHERE {_ROOM.column(db, 'slug')} IN ({rawread.placeholders(slugs)})"
        )
    return sql


def _rooms_and_memberships(
    pairs: Sequence[tuple[str, Any]],
) -> list[tuple[Room, Membership | None] | RoomNotFound]:
    """For each (slug, user): the room and what authorize() would look up for the user (or
    RoomNotFound), all in one query.

    Fixed SQL (rawread.py): the ORM spent most of this per-join read building the query."""
    db = connections[router.db_for_read(Room)]
    # Adapted as a queryset adapts it (a UUID primary key is text on SQLite, say); None for
    # users never looked up (anonymous, superusers).
    wanted = [
        _MEMBER_USER.get_db_prep_value(user.pk, db)
        if user is not None and user.is_authenticated and not user.is_superuser
        else None
        for _, user in pairs
    ]
    slugs = list(dict.fromkeys(slug for slug, _ in pairs))
    user_ids = list(dict.fromkeys(uid for uid in wanted if uid is not None)) or [None]
    with db.cursor() as cursor:
        cursor.execute(_join_sql(db, len(slugs), len(user_ids)), [*user_ids, *slugs])
        rows = cursor.fetchall()
    split = len(_ROOM.fields)
    rooms: dict[str, Room] = {}
    members: dict[tuple[str, Any], list[Any]] = {}
    for row in rows:
        # A room's columns repeat on each of its members' rows: one instance per room.
        room = rooms.get(row[_ROOM_SLUG])
        if room is None:
            room = rooms[row[_ROOM_SLUG]] = _ROOM.instance(db, row[:split])
        if row[split] is not None:
            # Prepared as the wanted ids were, so the two compare whatever the driver returns
            # (a UUID may come back as text, say).
            member = _MEMBER_USER.get_db_prep_value(row[split], db)
            members[(room.slug, member)] = _MEMBERSHIP.convert(db, row[split + 1 :])
    out: list[tuple[Room, Membership | None] | RoomNotFound] = []
    for (slug, user), uid in zip(pairs, wanted, strict=True):
        found = rooms.get(slug)
        if found is None:
            out.append(RoomNotFound(f"room {slug!r} does not exist"))
            continue
        values = members.get((slug, uid)) if uid is not None else None
        if values is None:
            out.append((found, None))
            continue
        mid, role, banned, created_at = values
        membership = Membership(
            id=mid, room=found, user=user, role=role, banned=banned, created_at=created_at
        )
        membership._state.adding = False  # a row read from the database, as a query makes it
        membership._state.db = db.alias
        out.append((found, membership))
    return out


def _room_and_membership(slug: str, user: Any) -> tuple[Room, Membership | None]:
    """The room and what authorize() would look up for ``user``, in one query."""
    (found,) = _rooms_and_memberships([(slug, user)])
    if isinstance(found, RoomNotFound):
        raise found
    return found


JoinRequest = tuple[str, Any, int | None, int | None]  # slug, user, after_seq, epoch


def join(slug: str, user: Any, after_seq: int | None, epoch: int | None) -> JoinResult:
    """Authorise a join and collect the replay a reconnecting client missed."""
    (result,) = join_many([(slug, user, after_seq, epoch)])
    if isinstance(result, Exception):
        raise result
    return result


def join_many(requests: Sequence[JoinRequest]) -> list[JoinResult | Exception]:
    """``join`` of each request, in order, with one query for all their rooms and memberships
    (session.py batches the joins that wait together). A refusal or failure of one request
    is returned in its place; a failure of the shared query is raised."""
    found = _rooms_and_memberships([(slug, user) for slug, user, _, _ in requests])
    results: list[JoinResult | Exception] = []
    for (slug, user, after_seq, epoch), item in zip(requests, found, strict=True):
        try:
            if isinstance(item, Exception):
                raise item
            results.append(_join(slug, user, after_seq, epoch, *item))
        except Exception as exc:
            results.append(exc)
    return results


def _join(
    slug: str,
    user: Any,
    after_seq: int | None,
    epoch: int | None,
    room: Room,
    membership: Membership | None,
) -> JoinResult:
    authorize(room, user, send=False, membership=membership)
    head = room.head_seq
    result = JoinResult(
        room=slug,
        head=head,
        epoch=room.epoch,
        recovered=False,
        can_send=is_allowed(room, user, send=True, membership=membership),
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


@dataclass
class AppendResult:
    message: dict[str, Any]
    created: bool


@dataclass(frozen=True)
class Append:
    """One message to persist (see append_messages)."""

    slug: str
    user: Any  # None: the server (publish()); otherwise authorised to post
    payload: dict[str, Any]
    client_msg_id: str | None = None


def append_message(
    slug: str, user: Any, payload: dict[str, Any], client_msg_id: str | None = None
) -> AppendResult:
    """Authorise and persist one message, allocating the room's next seq atomically.

    ``created`` is False when ``client_msg_id`` names a message this sender already stored
    in the room (a retry): that message is returned and nothing is written.
    """
    result = append_messages([Append(slug, user, payload, client_msg_id)])[0]
    if isinstance(result, Exception):
        raise result
    return result


@dataclass
class Plan:
    """What a batch does (see append_messages): the answers, and the rows to write."""

    results: list[AppendResult | RealtimeError | None]
    created: list[tuple[int, Message]]  # (item index, new message), in seq order per room
    repeats: list[tuple[int, Message]]  # retries of a message created in the same batch
    heads: dict[int, int]  # room pk -> its new head_seq (rooms that got messages)


def append_messages(items: list[Append]) -> list[AppendResult | RealtimeError]:
    """Persist several sends in one transaction (group commit); a result or error for each.

    Each item is authorised, deduplicated by ``client_msg_id`` and given its room's next seq
    exactly as if it were appended alone, in list order; one item's refusal does not affect
    the others. Every room involved is write-locked before anything is read (PostgreSQL:
    ``SELECT ... FOR UPDATE`` in primary-key order, so two processes never deadlock; SQLite:
    the write lock of the IMMEDIATE transaction, or of a first UPDATE without it), so two
    processes can never allocate the same seq, and a rolled-back transaction gives its seqs
    back (no hole). The statements per call are a constant number, not one set per message;
    on PostgreSQL with psycopg 3 they go in two round trips (realtime/pgbatch.py).
    """
    if pgbatch.supported():
        plan = pgbatch.store(
            (item.slug for item in items),
            _member_user_ids(items),
            _retry_keys(items),
            lambda rooms, memberships, existing: _plan(items, rooms, memberships, existing),
            _existing_rows,
        )
    else:
        plan = _append_with_orm(items)
    for i, message in plan.created:
        plan.results[i] = AppendResult(message_dict(message, items[i].slug), True)
    for i, message in plan.repeats:
        plan.results[i] = AppendResult(message_dict(message, items[i].slug), False)
    if plan.created:
        metrics.MESSAGES_PERSISTED.inc(len(plan.created))
    done = [r for r in plan.results if r is not None]
    assert len(done) == len(items)
    return done


def _append_with_orm(items: list[Append]) -> Plan:
    slugs = sorted({item.slug for item in items})
    with transaction.atomic():
        rooms_query = Room.objects.filter(slug__in=slugs)
        if connection.features.has_select_for_update:
            rooms_query = rooms_query.select_for_update().order_by("pk")
        else:
            # Take the write lock with the first statement (SQLite, DEFERRED mode).
            rooms_query.update(head_seq=F("head_seq"))
        rooms = {room.slug: room for room in rooms_query}
        plan = _plan(
            items, rooms, _memberships_for(rooms.values(), items), _existing_for(rooms, items)
        )
        if plan.created:
            _insert([m for _, m in plan.created])
            _set_heads(plan.heads)
    return plan


def _plan(
    items: list[Append],
    rooms: dict[str, Room],
    memberships: dict[tuple[int, Any], Membership],
    existing: dict[tuple[int, Any, str], Message],
) -> Plan:
    """Decide each item of a batch, given its locked rooms, memberships and stored retries."""
    results: list[AppendResult | RealtimeError | None] = [None] * len(items)
    heads = {slug: room.head_seq for slug, room in rooms.items()}
    created: list[tuple[int, Message]] = []
    # Retries of a message created earlier in this batch: answered once it has its id.
    fresh: dict[tuple[int, Any, str], Message] = {}
    repeats: list[tuple[int, Message]] = []
    for i, item in enumerate(items):
        room = rooms.get(item.slug)
        if room is None:
            results[i] = RoomNotFound(f"room {item.slug!r} does not exist")
            continue
        if item.user is not None:
            key = (room.pk, getattr(item.user, "pk", None))
            try:
                authorize(room, item.user, send=True, membership=memberships.get(key))
            except RealtimeError as exc:
                results[i] = exc
                continue
        sender = item.user if item.user is not None and item.user.is_authenticated else None
        dedupe = None
        if item.client_msg_id is not None and sender is not None:
            dedupe = (room.pk, sender.pk, item.client_msg_id)
            if dedupe in existing:
                results[i] = AppendResult(message_dict(existing[dedupe], room.slug), False)
                continue
            if dedupe in fresh:
                repeats.append((i, fresh[dedupe]))
                continue
        heads[room.slug] += 1
        message = Message(
            room=room,
            seq=heads[room.slug],
            sender=sender,
            payload=item.payload,
            client_msg_id=item.client_msg_id,
        )
        created.append((i, message))
        if dedupe is not None:
            fresh[dedupe] = message
    changed = {rooms[slug].pk: h for slug, h in heads.items() if h != rooms[slug].head_seq}
    return Plan(results, created, repeats, changed)


def _member_user_ids(items: list[Append]) -> set[Any]:
    """Users whose memberships authorize() needs (superusers need none)."""
    return {
        item.user.pk
        for item in items
        if item.user is not None and item.user.is_authenticated and not item.user.is_superuser
    }


def _retry_keys(items: list[Append]) -> set[tuple[str, Any, str]]:
    """(room, sender, client_msg_id) of every send that could repeat a stored message (only
    signed-in senders' ids are deduplicated)."""
    return {
        (item.slug, item.user.pk, item.client_msg_id)
        for item in items
        if item.client_msg_id is not None and item.user is not None and item.user.is_authenticated
    }


def _memberships_for(rooms: Any, items: list[Append]) -> dict[tuple[int, Any], Membership]:
    """The memberships authorize() needs for ``items``: one query for the whole batch."""
    user_ids = _member_user_ids(items)
    if not user_ids:
        return {}
    rows = Membership.objects.filter(room__in=list(rooms), user_id__in=user_ids).order_by()
    return {(m.room_id, m.user_id): m for m in rows}


def _existing_for(
    rooms: dict[str, Room], items: list[Append]
) -> dict[tuple[int, Any, str], Message]:
    """Messages already stored under the batch's client_msg_ids.

    One narrow query on the partial unique index (no ORDER BY, no join); the whole rows are
    read only for the ids that are there, which only retries have."""
    keys = _retry_keys(items)
    if not keys or not rooms:
        return {}
    hits = list(
        Message.objects.filter(
            room__in=list(rooms.values()),
            sender_id__in={sender for _, sender, _ in keys},
            client_msg_id__in={client_msg_id for _, _, client_msg_id in keys},
        )
        .order_by()
        .values_list("pk", flat=True)
    )
    return _existing_rows(hits) if hits else {}


def _existing_rows(ids: list[int]) -> dict[tuple[int, Any, str], Message]:
    """The stored messages with these ids, keyed as append_messages deduplicates."""
    rows = Message.objects.filter(pk__in=ids).select_related("sender").order_by()
    return {(m.room_id, m.sender_id, m.client_msg_id): m for m in rows if m.client_msg_id}


def _set_heads(heads: dict[int, int]) -> None:
    """``UPDATE room SET head_seq = CASE id ...``: every room of a batch in one statement."""
    if not heads:
        return
    quote = connection.ops.quote_name
    table, pk = quote(Room._meta.db_table), quote(Room._meta.pk.column)
    head = quote(Room._meta.get_field("head_seq").column)
    cases = " ".join(["WHEN %s THEN %s"] * len(heads))
    marks = ", ".join(["%s"] * len(heads))
    params: list[int] = [value for pair in heads.items() for value in pair]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {head} = CASE {pk} {cases} END WHERE {pk} IN ({marks})",
            [*params, *heads],
        )


def _insert(messages: list[Message]) -> None:
    if connection.features.can_return_rows_from_bulk_insert:
        Message.objects.bulk_create(messages)
    else:  # pragma: no cover - backends that cannot return the new ids
        for message in messages:
            message.save(force_insert=True)
