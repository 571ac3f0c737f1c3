"""Group commit on PostgreSQL (psycopg 3): a batch of sends in two round trips.

``services.append_messages`` decides what a batch stores; this module only does its I/O, in
psycopg's pipeline mode, with prepared statements whose text does not depend on the batch
size (arrays and ``unnest`` instead of ``IN (...)`` and ``VALUES`` lists):

1. ``BEGIN``; lock the batch's rooms (``SELECT ... FOR UPDATE``, primary-key order, as the
   ORM path does, so the two never deadlock); their memberships; the ids of messages already
   stored under the batch's ``client_msg_id``\\ s. One round trip.
2. ``INSERT ... SELECT FROM unnest(...) RETURNING``; one ``UPDATE`` of the room heads;
   ``COMMIT``. One round trip.

The ORM path costs seven round trips and about 2.8 ms of the process's CPU for a batch of
one; this one about 1 ms (docs/performance.md). Same transaction, same locks, same guarantees:
the tests of ``append_messages`` run against both paths (tests/test_postgres.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from django.db import connection
from django.db.models import Field, Model

from realtime.models import Membership, Message, Room

if TYPE_CHECKING:
    from realtime.services import Plan


def supported() -> bool:
    """True when the default database is PostgreSQL through psycopg 3 (not psycopg2) and no
    transaction is open: this path runs its own (``BEGIN`` ... ``COMMIT``), so inside a
    caller's ``atomic()`` block (``ATOMIC_REQUESTS``, a test case) the ORM path nests instead.
    """
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return False
    driver = getattr(connection, "Database", None)  # the DB-API module Django's backend uses
    return getattr(driver, "__name__", "") == "psycopg"


@dataclass(frozen=True)
class _Statements:
    lock: str
    members: str
    existing: str
    insert: str
    heads: str
    room_fields: list[str]
    member_fields: list[str]
    message_fields: list[Any]


def _columns(model: type[Model]) -> tuple[str, list[str]]:
    """The model's column list for a SELECT, and the attnames ``from_db`` takes them as."""
    fields = model._meta.concrete_fields
    quote = connection.ops.quote_name
    return ", ".join(quote(f.column) for f in fields), [f.attname for f in fields]


def _column(model: type[Model], name: str) -> str:
    field = model._meta.get_field(name)
    assert isinstance(field, Field) and field.column is not None
    return connection.ops.quote_name(field.column)


@cache
def _statements() -> _Statements:
    quote = connection.ops.quote_name
    room, member, message = (quote(m._meta.db_table) for m in (Room, Membership, Message))
    pk, slug, head = (_column(Room, n) for n in ("id", "slug", "head_seq"))
    m_room, m_user = (_column(Membership, n) for n in ("room", "user"))
    msg_room, msg_id, msg_seq = (_column(Message, n) for n in ("room", "id", "seq"))
    msg_client_id, msg_sender = _column(Message, "client_msg_id"), _column(Message, "sender")
    sender_type = Message._meta.get_field("sender").db_type(connection)
    room_columns, room_fields = _columns(Room)
    member_columns, member_fields = _columns(Membership)
    rooms_of_batch = f"SELECT {pk} FROM {room} WHERE {slug} = ANY(%s)"
    insert_fields = [f for f in Message._meta.concrete_fields if not f.primary_key]
    arrays = ", ".join(f"%s::{f.db_type(connection)}[]" for f in insert_fields)
    return _Statements(
        lock=f"SELECT {room_columns} FROM {room} WHERE {slug} = ANY(%s) ORDER BY {pk} FOR UPDATE",
        members=(
            f"SELECT {member_columns} FROM {member} "
            f"WHERE {m_room} IN ({rooms_of_batch}) AND {m_user} = ANY(%s)"
        ),
        # Joined on exactly the batch's (room, sender, client_msg_id) keys, so even the
        # generic plan of the prepared statement walks the partial unique index.
        existing=(
            f"SELECT m.{msg_id} FROM unnest(%s::text[], %s::{sender_type}[], %s::text[]) "
            f"AS k(slug, sender, client_msg_id) JOIN {room} r ON r.{slug} = k.slug "
            f"JOIN {message} m ON m.{msg_room} = r.{pk} AND m.{msg_sender} = k.sender "
            f"AND m.{msg_client_id} = k.client_msg_id"
        ),
        insert=(
            f"INSERT INTO {message} ({', '.join(quote(f.column) for f in insert_fields)}) "
            f"SELECT * FROM unnest({arrays}) RETURNING {msg_id}, {msg_room}, {msg_seq}"
        ),
        heads=(
            f"UPDATE {room} SET {head} = v.head FROM unnest(%s::bigint[], %s::bigint[]) "
            f"AS v(id, head) WHERE {room}.{pk} = v.id"
        ),
        room_fields=room_fields,
        member_fields=member_fields,
        message_fields=insert_fields,
    )


def store(
    slugs: Iterable[str],
    user_ids: Iterable[Any],
    retry_keys: Iterable[tuple[str, Any, str]],
    plan: Callable[[dict[str, Room], dict[tuple[int, Any], Membership], Any], Plan],
    load_existing: Callable[[list[int]], Any],
) -> Plan:
    """Lock the batch's rooms, read what ``plan`` needs, run it, store what it creates.

    ``user_ids``: whose memberships to read. ``retry_keys``: the (room slug, sender pk,
    client_msg_id) the batch could repeat; ``load_existing(ids)`` reads the messages it does
    repeat (retries only; an ORM query inside the same transaction)."""
    psycopg = connection.Database  # type: ignore[attr-defined]  # the driver: see supported()
    sql = _statements()
    connection.ensure_connection()
    raw = connection.connection
    # Honour OPTIONS["prepare_threshold"] = None (PgBouncer in transaction mode before 1.21).
    prepare = None if raw.prepare_threshold is None else True
    rooms_wanted = sorted(set(slugs))
    users = sorted(set(user_ids), key=str)
    keys = [list(column) for column in zip(*sorted(set(retry_keys)), strict=True)]

    def run(query: str, params: list[Any]) -> Any:
        cursor = psycopg.Cursor(raw)
        cursor.execute(query, params, prepare=prepare)
        return cursor

    with connection.wrap_database_errors:
        try:
            with raw.pipeline():
                raw.execute("BEGIN")
                rooms_cursor = run(sql.lock, [rooms_wanted])
                members_cursor = run(sql.members, [rooms_wanted, users]) if users else None
                existing_cursor = run(sql.existing, keys) if keys else None
            rooms = {
                room.slug: room
                for room in (
                    Room.from_db(connection.alias, sql.room_fields, row)
                    for row in rooms_cursor.fetchall()
                )
            }
            memberships = {}
            if members_cursor is not None:
                for row in members_cursor.fetchall():
                    m = Membership.from_db(connection.alias, sql.member_fields, row)
                    memberships[(m.room_id, m.user_id)] = m
            hits = [row[0] for row in existing_cursor.fetchall()] if existing_cursor else []
            result = plan(rooms, memberships, load_existing(hits) if hits else {})
            with raw.pipeline():
                inserted = None
                if result.created:
                    messages = [message for _, message in result.created]
                    columns = [
                        [f.get_db_prep_save(getattr(m, f.attname), connection) for m in messages]
                        for f in sql.message_fields
                    ]
                    inserted = run(sql.insert, columns)
                    run(sql.heads, [list(result.heads), list(result.heads.values())])
                raw.execute("COMMIT")
            if inserted is not None:
                by_seq = {(room_id, seq): pk for pk, room_id, seq in inserted.fetchall()}
                for _, message in result.created:
                    message.pk = by_seq[(message.room_id, message.seq)]
                    message._state.adding = False
                    message._state.db = connection.alias
            return result
        except BaseException:
            if not raw.closed and raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with contextlib.suppress(Exception):
                    raw.execute("ROLLBACK")
            raise
