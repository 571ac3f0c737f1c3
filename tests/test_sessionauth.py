"""SessionAuthMiddleware: channels' AuthMiddlewareStack's user, read with fixed SQL when it can."""

import asyncio
import datetime as dt

import pytest
from channels.auth import get_user as channels_get_user
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.backends import ModelBackend
from django.contrib.sessions.backends.cached_db import SessionStore as CachedDbStore
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.utils import timezone

from realtime import sessionauth
from realtime.sessionauth import SessionAuthMiddleware, session_user, session_users

pytestmark = pytest.mark.django_db

MODEL = "django.contrib.auth.backends.ModelBackend"
ALLOW_ALL = "django.contrib.auth.backends.AllowAllUsersModelBackend"
CUSTOM = "tests.test_sessionauth.RenamingBackend"


class RenamingBackend(ModelBackend):
    """Its own get_user: the fixed-SQL read must not stand in for it."""

    def get_user(self, user_id):
        user = super().get_user(user_id)
        if user is not None:
            user.first_name = "from-backend"
        return user


def login(user, backend=MODEL, store=SessionStore, hash_=None):
    session = store()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = backend
    session[HASH_SESSION_KEY] = user.get_session_auth_hash() if hash_ is None else hash_
    session.save()
    return session.session_key


def both(key, store=SessionStore):
    """(ours, channels') user for a fresh session object of ``key`` each."""
    ours = session_user(store(key))
    theirs = channels_get_user.func({"session": store(key)})
    return ours, theirs


def fields(user):
    return {f.attname: getattr(user, f.attname) for f in type(user)._meta.concrete_fields}


def test_a_logged_in_session_gives_the_same_user_in_two_queries(users, django_assert_num_queries):
    key = login(users["alice"])
    with django_assert_num_queries(2) as queries:
        user = session_user(SessionStore(key))
    # Fixed SQL, not querysets (a queryset's .get() adds LIMIT 21).
    assert not any("LIMIT" in q["sql"] for q in queries.captured_queries), queries
    theirs = channels_get_user.func({"session": SessionStore(key)})
    assert user.is_authenticated and user.pk == users["alice"].pk
    assert fields(user) == fields(theirs)
    assert user.last_login is None or user.last_login.tzinfo is not None
    assert user.date_joined.tzinfo is not None and not user._state.adding


@pytest.mark.parametrize(
    "case", ["no cookie", "unknown key", "short key", "expired", "no user id", "user deleted"]
)
def test_no_session_user_is_anonymous_as_with_channels(users, case):
    key = login(users["bob"])
    if case == "no cookie":
        key = None
    elif case == "unknown key":
        key = "x" * 32
    elif case == "short key":
        key = "abc"
    elif case == "expired":
        Session.objects.filter(pk=key).update(expire_date=timezone.now() - dt.timedelta(seconds=1))
    elif case == "no user id":
        session = SessionStore(key)
        del session[SESSION_KEY]
        session.save()
    elif case == "user deleted":
        users["bob"].delete()
    ours, theirs = both(key)
    assert not ours.is_authenticated and not theirs.is_authenticated
    if case == "expired":
        session = SessionStore(key)
        session_user(session)
        assert session.session_key is None  # as SessionStore.load(): a new, empty session


def test_a_stale_auth_hash_flushes_the_session_as_with_channels(users):
    key = login(users["carol"], hash_="stale")
    assert not session_user(SessionStore(key)).is_authenticated
    assert not Session.objects.filter(pk=key).exists()  # flushed, as channels does


def test_a_password_change_logs_the_session_out(users):
    key = login(users["carol"])
    users["carol"].set_password("new password")
    users["carol"].save()
    assert not session_user(SessionStore(key)).is_authenticated


def test_backend_rules_hold(users, settings):
    alice = users["alice"]
    alice.is_active = False
    alice.save()
    # ModelBackend refuses an inactive user; AllowAllUsersModelBackend (its subclass, same
    # get_user) takes it; a backend missing from AUTHENTICATION_BACKENDS gives no user.
    settings.AUTHENTICATION_BACKENDS = [MODEL, ALLOW_ALL]
    assert not session_user(SessionStore(login(alice))).is_authenticated
    ours, theirs = both(login(alice, ALLOW_ALL))
    assert ours.pk == theirs.pk == alice.pk
    settings.AUTHENTICATION_BACKENDS = [MODEL]
    assert not session_user(SessionStore(login(alice, ALLOW_ALL))).is_authenticated


def test_a_backend_with_its_own_get_user_is_asked(users, settings):
    settings.AUTHENTICATION_BACKENDS = [MODEL, CUSTOM]
    ours, theirs = both(login(users["bob"], CUSTOM))
    assert ours.first_name == theirs.first_name == "from-backend"


def test_another_session_engine_loads_itself(users, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    key = login(users["bob"], store=CachedDbStore)
    ours, theirs = both(key, store=CachedDbStore)
    assert ours.pk == theirs.pk == users["bob"].pk


@pytest.mark.django_db(transaction=True)
async def test_the_middleware_fills_cookies_session_and_user(users, settings):
    from asgiref.sync import sync_to_async

    key = await sync_to_async(login)(users["alice"])
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)

    middleware = SessionAuthMiddleware(app)
    header = f"theme=dark; {settings.SESSION_COOKIE_NAME}={key}".encode()
    await middleware({"type": "websocket", "headers": [(b"cookie", header)]}, None, None)
    assert seen["cookies"] == {"theme": "dark", settings.SESSION_COOKIE_NAME: key}
    assert seen["session"].session_key == key and seen["user"].pk == users["alice"].pk
    seen.clear()
    await middleware({"type": "websocket", "headers": []}, None, None)
    assert seen["cookies"] == {} and not seen["user"].is_authenticated


def test_a_batch_gives_each_session_what_it_gets_alone_in_two_queries(
    users, settings, django_assert_num_queries
):
    settings.AUTHENTICATION_BACKENDS = [MODEL, CUSTOM]
    expired = login(users["bob"])
    Session.objects.filter(pk=expired).update(expire_date=timezone.now() - dt.timedelta(seconds=1))
    keys = [
        login(users["alice"]),
        login(users["alice"]),  # the same user twice: still an instance each
        login(users["bob"]),
        None,
        "x" * 32,
        expired,
        login(users["carol"], hash_="stale"),  # flushed: a SELECT and a DELETE of its own
        login(users["staff"], CUSTOM),  # its backend's own get_user: a query each
        login(users["staff"], CUSTOM),
    ]
    alone = [session_user(SessionStore(k)) for k in keys[:-3]]
    with django_assert_num_queries(2 + 2 + 2):
        together = session_users([SessionStore(k) for k in keys])
    assert [u.pk for u in together[:-3]] == [u.pk for u in alone]
    assert [fields(u) for u in together[:3]] == [fields(u) for u in alone[:3]]
    assert together[0] is not together[1] and together[0].pk == together[1].pk
    assert [u.is_authenticated for u in together[3:]] == [False, False, False, False, True, True]
    assert together[-1].first_name == together[-2].first_name == "from-backend"
    assert together[-1] is not together[-2]  # the backend's object for each session
    assert not Session.objects.filter(pk=keys[6]).exists()


def test_one_sessions_bad_user_id_fails_that_session_only(users):
    broken = SessionStore()
    broken[SESSION_KEY] = "not-a-number"
    broken[BACKEND_SESSION_KEY] = MODEL
    broken.save()
    fine = login(users["bob"])
    with pytest.raises(ValidationError):
        session_user(SessionStore(broken.session_key))  # as channels' get_user
    got = session_users([SessionStore(broken.session_key), SessionStore(fine)])
    assert isinstance(got[0], ValidationError)
    assert got[1].pk == users["bob"].pk


@pytest.mark.django_db(transaction=True)
async def test_concurrent_handshakes_share_one_lookup(users, settings, monkeypatch):
    from asgiref.sync import sync_to_async

    keys = [await sync_to_async(login)(users[name]) for name in ("alice", "bob", "carol") * 3]
    batches = []
    real = sessionauth.session_users

    def counted(sessions):
        batches.append(len(sessions))
        return real(sessions)

    monkeypatch.setattr(sessionauth, "session_users", counted)
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["user"].username)

    middleware = SessionAuthMiddleware(app)

    def scope(key):
        header = f"{settings.SESSION_COOKIE_NAME}={key}".encode()
        return {"type": "websocket", "headers": [(b"cookie", header)]}

    await asyncio.gather(*(middleware(scope(k), None, None) for k in keys))
    assert batches == [len(keys)]  # one thread hop for all of them
    assert sorted(seen) == sorted(["alice", "bob", "carol"] * 3)
    # Alone, a handshake still goes at once in a batch of its own.
    await middleware(scope(keys[0]), None, None)
    assert batches == [len(keys), 1]


@pytest.mark.django_db(transaction=True)
async def test_a_failed_shared_read_fails_every_handshake_of_its_batch(settings, monkeypatch):
    from django.db import OperationalError

    def down(sessions):
        raise OperationalError("the database is down")

    monkeypatch.setattr(sessionauth, "_load_sessions", down)
    middleware = SessionAuthMiddleware(lambda scope, receive, send: None)
    header = f"{settings.SESSION_COOKIE_NAME}={'k' * 32}".encode()
    scope = {"type": "websocket", "headers": [(b"cookie", header)]}
    results = await asyncio.gather(
        *(middleware(dict(scope), None, None) for _ in range(3)), return_exceptions=True
    )
    assert [type(r) for r in results] == [OperationalError] * 3
