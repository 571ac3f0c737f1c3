"""Session authentication for WebSocket handshakes: channels' AuthMiddlewareStack, faster.

``SessionAuthMiddleware`` puts the same things in the scope as channels'
``AuthMiddlewareStack`` (``cookies``, ``session``, ``user``) by the same rules (the session's
user through its backend, and the session's auth hash checked, a mismatch flushing the session),
in one thread hop. What differs is how the two reads are made when nothing is customised:

- the session, when ``SESSION_ENGINE`` is Django's database engine;
- the user, when the session's backend uses ``ModelBackend.get_user`` and the user model's
  default manager is a plain ``Manager``;

are read with fixed SQL (rawread.py) instead of a queryset built per connection: about 600 µs
less CPU per handshake, which is most of what session auth costs. Any other engine, backend or
manager goes through Django's own code, as with channels.

Handshakes that wait for their user at the same time share one thread hop: the look-ups of
one event loop are batched (``dbthread.Batched``), each batch reading its database sessions
in one query and their users in another. A lone handshake goes at once, as before; under a burst
(a reconnect storm) the hop and the queries are paid once per batch, not once per handshake.

HTTP scopes go through channels' stack unchanged (it saves sessions on HTTP responses; a
WebSocket handshake never does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import import_module
from typing import Any

from channels.auth import AuthMiddleware, _get_user_session_key
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, get_user_model, load_backend
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore
from django.db import connections, models, router
from django.http.cookie import parse_cookie
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from realtime import rawread
from realtime.dbthread import Batched


class SessionAuthMiddleware(AuthMiddleware):  # type: ignore[misc]
    """``cookies``, ``session`` and ``user`` in the scope, as channels' AuthMiddlewareStack."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self._http = CookieMiddleware(SessionMiddleware(AuthMiddleware(inner)))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            return await self._http(scope, receive, send)
        scope = dict(scope)
        if "cookies" not in scope:
            scope["cookies"] = _cookies(scope)
        if "session" not in scope:  # an outer session middleware's session stands
            store = _session_store(settings.SESSION_ENGINE)
            scope["session"] = store(scope["cookies"].get(settings.SESSION_COOKIE_NAME))
        scope["user"] = await _users(scope["session"])
        return await self.inner(scope, receive, send)


# Handshakes waiting for their user at the same time share one thread hop (dbthread.Batched).
_users: Batched[Any, Any] = Batched(lambda sessions: session_users(sessions))


def _cookies(scope: dict[str, Any]) -> dict[str, str]:
    """channels' CookieMiddleware: the first Cookie header, parsed as Django parses it."""
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            return parse_cookie(bytes(value).decode("latin1"))
    return {}


@functools.cache
def _session_store(engine: str) -> Any:
    return import_module(engine).SessionStore


def session_user(session: Any) -> Any:
    """The session's user, or AnonymousUser: channels.auth.get_user's rules (sync in a thread)."""
    (user,) = session_users([session])
    if isinstance(user, Exception):
        raise user
    return user


def session_users(sessions: Sequence[Any]) -> list[Any]:
    """``session_user`` of each session, in order, in two queries for the fixed-SQL kinds.

    An error of one session's own look-up (a malformed user id, a custom backend's failure) is
    returned in its place, as an exception instance; an error of a shared query is raised.
    """
    _load_sessions(sessions)
    wanted: list[tuple[Any, Any] | Exception | None] = []
    for session in sessions:
        try:
            wanted.append(_wanted_user(session))
        except Exception as exc:
            wanted.append(exc)
    fetched = _fetch_users([w for w in wanted if isinstance(w, tuple)])
    users: list[Any] = []
    for session, want in zip(sessions, wanted, strict=True):
        if not isinstance(want, tuple):
            users.append(want if isinstance(want, Exception) else AnonymousUser())
            continue
        try:
            user = fetched.get(want)
            if isinstance(user, Exception):
                raise user
            if isinstance(user, _Row | _Call):
                user = user.user()
            users.append(_verified(session, user))
        except Exception as exc:
            users.append(exc)
    return users


def _wanted_user(session: Any) -> tuple[Any, Any] | None:
    """(backend path, user id) the session is logged in as, if its backend is still enabled."""
    try:
        user_id = _get_user_session_key(session)
        backend_path = session[BACKEND_SESSION_KEY]
    except KeyError:
        return None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    return backend_path, user_id


def _verified(session: Any, user: Any) -> Any:
    """``user`` if the session's auth hash matches it; else the session is flushed."""
    if hasattr(user, "get_session_auth_hash"):
        session_hash = session.get(HASH_SESSION_KEY)
        verified = session_hash and constant_time_compare(
            session_hash, user.get_session_auth_hash()
        )
        if not verified:
            session.flush()
            user = None
    return user or AnonymousUser()


def _plain(model: type[models.Model], manager: Any) -> bool:
    """True when ``manager.get(pk=...)`` is exactly a primary-key read of ``model``'s table."""
    kind = type(manager)
    return (
        kind.get is models.Manager.get
        and kind.get_queryset is models.Manager.get_queryset
        and manager._queryset_class is models.QuerySet
        and manager.model is model
    )


def _load_sessions(sessions: Sequence[Any]) -> None:
    """Read database sessions with fixed SQL, one query per database; any other session
    loads itself when read."""
    by_db: dict[str, list[Any]] = {}
    for session in sessions:
        if type(session) is not DatabaseSessionStore or hasattr(session, "_session_cache"):
            continue
        model = session.model
        if not _plain(model, model.objects):
            continue
        if session.session_key is None:
            continue  # no valid key: the session is empty without a read
        by_db.setdefault(router.db_for_read(model), []).append(session)
    for alias, group in by_db.items():
        db = connections[alias]
        model = group[0].model
        meta = model._meta
        key_field: Any = meta.get_field("session_key")
        expire_field: Any = meta.get_field("expire_date")
        keys = sorted({s.session_key for s in group})
        params = [key_field.get_db_prep_value(k, db, prepared=False) for k in keys]
        params.append(expire_field.get_db_prep_value(timezone.now(), db, prepared=False))
        with db.cursor() as cursor:
            cursor.execute(_session_sql(model, alias, len(keys)), params)
            found = dict(cursor.fetchall())
        for session in group:
            store: Any = session  # _session_cache and _session_key are SessionBase's own
            data = found.get(session.session_key)
            if data is None:
                # As SessionStore.load(): a missing or expired session is an empty, new one.
                store._session_key = None
                store._session_cache = {}
            else:
                store._session_cache = store.decode(data)


# The fixed SQL is written once per model and database (functools.cache), not per handshake.


@functools.cache
def _session_sql(model: type[models.Model], alias: str, count: int) -> str:
    db, columns = connections[alias], rawread.Columns(model, "s", ["session_key", "session_data"])
    return (
        f"SELECT {columns.select(db)} FROM {columns.table(db)}"
        f" WHERE {columns.column(db, 'session_key')} IN ({rawread.placeholders(count)})"
        f" AND {columns.column(db, 'expire_date')} > %s"
    )


@functools.cache
def _user_read(
    model: type[models.Model], alias: str, count: int
) -> tuple[rawread.Columns[Any], str]:
    db, columns = connections[alias], rawread.Columns(model, "u")
    pk: Any = model._meta.pk
    sql = (
        f"SELECT {columns.select(db)} FROM {columns.table(db)}"
        f" WHERE {columns.column(db, pk.name)} IN ({rawread.placeholders(count)})"
    )
    return columns, sql


def _fetch_users(wanted: list[tuple[Any, Any]]) -> dict[tuple[Any, Any], Any]:
    """What ``backend.get_user(user_id)`` gives for each wanted (backend path, user id): a
    ``_Row`` of ModelBackend's one fixed-SQL query, a ``_Call`` of any other backend, None
    when there is no such user, or the exception of that one look-up. Each session turns it
    into a user object of its own."""
    user_model = get_user_model()
    plain_model = _plain(user_model, user_model._default_manager)
    out: dict[tuple[Any, Any], _Row | _Call | Exception | None] = {}
    fixed: dict[Any, list[tuple[tuple[Any, Any], Any]]] = {}  # prepared pk -> (want, backend)
    pk: Any = user_model._meta.pk
    db = connections[router.db_for_read(user_model)]
    for want in dict.fromkeys(wanted):  # each distinct want once, in order
        backend_path, user_id = want
        try:
            backend = load_backend(backend_path)
            if type(backend).get_user is not ModelBackend.get_user or not plain_model:
                out[want] = _Call(backend, user_id)  # asked per session, as channels does
                continue
            key = pk.get_db_prep_value(user_id, db, prepared=False)
        except Exception as exc:
            out[want] = exc
            continue
        fixed.setdefault(key, []).append((want, backend))
    if not fixed:
        return out
    keys = list(fixed)
    columns, sql = _user_read(user_model, db.alias, len(keys))
    with db.cursor() as cursor:
        cursor.execute(sql, keys)
        rows = cursor.fetchall()
    pk_index = columns.attnames.index(pk.attname)
    by_key = {pk.get_db_prep_value(row[pk_index], db, prepared=False): row for row in rows}
    for key, wants in fixed.items():
        row = by_key.get(key)
        for want, backend in wants:
            out[want] = None if row is None else _Row(columns, db, row, backend)
    return out


class _Call:
    """A backend's own ``get_user``, called for each session that wants it (each gets the
    object the backend makes for it)."""

    def __init__(self, backend: Any, user_id: Any) -> None:
        self.backend, self.user_id = backend, user_id

    def user(self) -> Any:
        return self.backend.get_user(self.user_id)


class _Row:
    """A user row read for ModelBackend: each session that wants it gets an instance of its
    own (as a queryset would give each), if the backend lets that user authenticate."""

    def __init__(self, columns: rawread.Columns[Any], db: Any, row: Any, backend: Any) -> None:
        self.columns, self.db, self.row = columns, db, row
        self.backend = backend  # a ModelBackend (its get_user is what this read stands for)

    def user(self) -> Any:
        user = self.columns.instance(self.db, self.row)
        return user if self.backend.user_can_authenticate(user) else None


def SessionAuthStack(inner: Any) -> SessionAuthMiddleware:
    """Drop-in for channels' ``AuthMiddlewareStack``."""
    return SessionAuthMiddleware(inner)
