"""The HTTP JSON API: every endpoint, and every error as a JSON body with its status."""

import hmac
import json

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection
from django.test import Client

from realtime import broker, publishing, services, views
from realtime.models import Membership, Message, Room
from tests.test_publishing import Socket

pytestmark = pytest.mark.django_db(transaction=True)

API = "/realtime/api"
KEY = "s3cret-server-key"


@pytest.fixture
def broadcasts(monkeypatch):
    """Record broadcasts instead of sending them."""
    sent = []
    monkeypatch.setattr(publishing, "broadcast", sent.append)
    return sent


@pytest.fixture
def layer_down(monkeypatch):
    async def down(*args):
        raise ConnectionError("layer down")

    monkeypatch.setattr(broker, "publish_message", down)


def error_of(response, status, code):
    """The error message of a JSON error response, after checking its status and code."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]["message"]


def post_json(client, path, body, **extra):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data, content_type="application/json", **extra)


def as_user(client, user):
    client.force_login(user)
    return client


def add_messages(n, room="lobby", user=None):
    return [services.append_message(room, user, {"text": str(i)}).message for i in range(n)]


# -- GET rooms/ ----------------------------------------------------------------------------


def test_rooms_lists_readable_rooms_with_head(client, users, rooms):
    add_messages(2)
    body = as_user(client, users["carol"]).get(f"{API}/rooms/").json()
    assert body["rooms"][0] == {
        "room": "lobby",
        "title": "Lobby",
        "kind": "public",
        "seq": 2,
        "epoch": 1,
    }
    assert [r["room"] for r in body["rooms"]] == ["lobby", "news"]


def test_rooms_refuses_post_with_json_405(client, users):
    response = as_user(client, users["alice"]).post(f"{API}/rooms/")
    assert "POST" in error_of(response, 405, "bad_frame")
    assert response["Allow"] == "GET"


# -- GET rooms/<room>/messages -------------------------------------------------------------


def seqs(response):
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["room"] == "lobby"
    return [m["seq"] for m in body["messages"]]


def test_history_pages_like_the_websocket(client, users, rooms):
    add_messages(60, user=users["bob"])
    alice = as_user(client, users["alice"])
    assert seqs(alice.get(f"{API}/rooms/lobby/messages")) == list(range(11, 61))  # default 50
    assert seqs(alice.get(f"{API}/rooms/lobby/messages?limit=3")) == [58, 59, 60]
    assert seqs(alice.get(f"{API}/rooms/lobby/messages?before_seq=5&limit=2")) == [3, 4]
    assert seqs(alice.get(f"{API}/rooms/lobby/messages?after_seq=57")) == [58, 59, 60]
    assert seqs(alice.get(f"{API}/rooms/lobby/messages?after_seq=10&limit=3")) == [11, 12, 13]
    page = alice.get(f"{API}/rooms/lobby/messages?after_seq=10&before_seq=13&limit=100")
    assert seqs(page) == [11, 12]
    assert seqs(alice.get(f"{API}/rooms/lobby/messages?after_seq=60")) == []


def test_history_elements_are_message_frames_without_type(client, users, rooms):
    [sent] = add_messages(1, user=users["bob"])
    body = as_user(client, users["alice"]).get(f"{API}/rooms/lobby/messages").json()
    assert body["messages"] == [sent]
    assert body["messages"][0]["sender"] == {"id": users["bob"].pk, "name": "bob"}


def test_history_keeps_tombstones(client, users, rooms):
    add_messages(2)
    Message.objects.filter(seq=1).update(retracted=True)
    alice = as_user(client, users["alice"])
    for query in ("", "?after_seq=0"):
        first = alice.get(f"{API}/rooms/lobby/messages{query}").json()["messages"][0]
        assert (first["seq"], first["payload"], first["retracted"]) == (1, None, True)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=",
        "limit=1.5",
        "limit=-1",
        "limit=+5",
        "after_seq=-1",
        "after_seq=x",
        "before_seq=0",
        "before_seq=9223372036854775808",
        "after_seq=99999999999999999999",
    ],
)
def test_history_refuses_bad_numbers(client, users, rooms, query):
    response = as_user(client, users["alice"]).get(f"{API}/rooms/lobby/messages?{query}")
    assert query.split("=")[0] in error_of(response, 400, "bad_frame")


def test_history_largest_seq_is_accepted(client, users, rooms):
    response = as_user(client, users["alice"]).get(
        f"{API}/rooms/lobby/messages?before_seq=9223372036854775807&limit=100"
    )
    assert seqs(response) == []


@pytest.mark.parametrize(
    ("user", "room", "status", "code"),
    [
        (None, "lobby", 401, "unauthorized"),
        ("carol", "team", 403, "forbidden"),
        ("alice", "nowhere", 404, "room_not_found"),
        ("alice", "Not-A-Slug", 400, "invalid_room"),
        ("alice", "a" * 65, 400, "invalid_room"),
    ],
)
def test_history_errors(client, users, rooms, user, room, status, code):
    if user:
        client.force_login(users[user])
    error_of(client.get(f"{API}/rooms/{room}/messages"), status, code)


def test_history_for_anonymous_when_anonymous_read_is_on(client, rooms, settings):
    settings.REALTIME_ALLOW_ANONYMOUS_READ = True
    assert client.get(f"{API}/rooms/lobby/messages").status_code == 200
    error_of(client.get(f"{API}/rooms/team/messages"), 401, "unauthorized")


def test_history_of_banned_user_and_archived_room_is_forbidden(client, users, rooms):
    Membership.objects.create(room=rooms["lobby"], user=users["carol"], banned=True)
    error_of(as_user(client, users["carol"]).get(f"{API}/rooms/lobby/messages"), 403, "forbidden")
    Room.objects.filter(slug="news").update(archived=True)
    error_of(client.get(f"{API}/rooms/news/messages"), 403, "forbidden")


# -- POST rooms/<room>/messages --------------------------------------------------------------


def test_post_message_as_the_logged_in_user(client, users, rooms, broadcasts):
    response = post_json(
        as_user(client, users["alice"]), f"{API}/rooms/lobby/messages", {"payload": {"text": "hi"}}
    )
    assert response.status_code == 201, response.content
    message = response.json()
    assert (message["room"], message["seq"], message["payload"]) == ("lobby", 1, {"text": "hi"})
    assert message["sender"] == {"id": users["alice"].pk, "name": "alice"}
    assert message["id"] == Message.objects.get().pk
    assert broadcasts == [message]


def test_post_retry_with_client_msg_id_returns_the_original(client, users, rooms, broadcasts):
    alice = as_user(client, users["alice"])
    body = {"payload": {"text": "once"}, "client_msg_id": "c-1"}
    first = post_json(alice, f"{API}/rooms/lobby/messages", body)
    again = post_json(alice, f"{API}/rooms/lobby/messages", body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert Message.objects.count() == 1
    assert len(broadcasts) == 2  # a retry broadcasts again, as on the WebSocket


async def test_post_message_reaches_joined_sockets(hub, users, rooms):
    bob = Socket(users["bob"])
    await bob.open()
    await bob.join("lobby")
    client = Client()
    await sync_to_async(client.force_login)(users["alice"])
    response = await sync_to_async(post_json)(
        client, f"{API}/rooms/lobby/messages", {"payload": {"text": "over http"}}
    )
    assert response.status_code == 201
    [frame] = await bob.messages(1)
    assert frame == {"type": "message", **response.json()}
    await bob.close()


def csrf_client(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/accounts/login/")  # sets the csrftoken cookie
    return client, client.cookies["csrftoken"].value


def test_post_message_enforces_csrf(users, rooms, broadcasts):
    client, token = csrf_client(users["alice"])
    url = f"{API}/rooms/lobby/messages"
    body = {"payload": {"text": "x"}}
    assert "CSRF" in error_of(post_json(client, url, body), 403, "forbidden")
    bad = post_json(client, url, body, HTTP_X_CSRFTOKEN="x" * 32)
    assert "CSRF" in error_of(bad, 403, "forbidden")
    assert Message.objects.count() == 0
    assert post_json(client, url, body, HTTP_X_CSRFTOKEN=token).status_code == 201


def test_post_message_anonymous_is_unauthorized(client, rooms):
    response = post_json(client, f"{API}/rooms/lobby/messages", {"payload": {"text": "x"}})
    error_of(response, 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("{not json", 400, "bad_frame"),
        (b"\xff\xfe", 400, "bad_frame"),
        ('{"payload": {"n": NaN}}', 400, "bad_frame"),
        ("[1, 2]", 400, "bad_frame"),
        ({}, 400, "bad_frame"),
        ({"payload": "text"}, 400, "bad_frame"),
        ({"payload": None}, 400, "bad_frame"),
        ({"payload": {"nul": "a\u0000b"}}, 400, "bad_frame"),
        ({"payload": {}, "client_msg_id": ""}, 400, "bad_frame"),
        ({"payload": {}, "client_msg_id": "x" * 65}, 400, "bad_frame"),
        ({"payload": {}, "client_msg_id": 7}, 400, "bad_frame"),
        ({"payload": {"big": "x" * 70_000}}, 413, "too_large"),
    ],
)
def test_post_message_bad_bodies(client, users, rooms, body, status, code):
    response = post_json(as_user(client, users["alice"]), f"{API}/rooms/lobby/messages", body)
    error_of(response, status, code)
    assert Message.objects.count() == 0


def test_post_message_body_over_django_limit_is_too_large(client, users, rooms, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"payload": {"text": "x" * 2000}}
    response = post_json(as_user(client, users["alice"]), f"{API}/rooms/lobby/messages", body)
    error_of(response, 413, "too_large")


@pytest.mark.parametrize(
    ("user", "room", "status", "code"),
    [
        ("carol", "team", 403, "forbidden"),
        ("alice", "news", 403, "forbidden"),  # announce room: staff and moderators only
        ("alice", "nowhere", 404, "room_not_found"),
        ("alice", "LOBBY", 400, "invalid_room"),
    ],
)
def test_post_message_rights(client, users, rooms, user, room, status, code):
    response = post_json(
        as_user(client, users[user]), f"{API}/rooms/{room}/messages", {"payload": {"t": 1}}
    )
    error_of(response, status, code)


def test_post_message_staff_may_announce(client, users, rooms, broadcasts):
    response = post_json(
        as_user(client, users["staff"]), f"{API}/rooms/news/messages", {"payload": {"t": 1}}
    )
    assert response.status_code == 201


def test_post_message_broadcast_failure_is_503_and_a_retry_recovers(
    client, users, rooms, monkeypatch
):
    alice = as_user(client, users["alice"])
    body = {"payload": {"text": "x"}, "client_msg_id": "c-9"}

    async def down(*args):
        raise ConnectionError("layer down")

    monkeypatch.setattr(broker, "publish_message", down)
    message = error_of(post_json(alice, f"{API}/rooms/lobby/messages", body), 503, "unavailable")
    assert "client_msg_id" in message
    monkeypatch.undo()
    retry = post_json(alice, f"{API}/rooms/lobby/messages", body)
    assert (retry.status_code, retry.json()["seq"]) == (200, 1)


def test_database_failure_is_503(client, users, rooms, monkeypatch):
    def fail(*args):
        raise OperationalError("database is locked")

    monkeypatch.setattr(services, "append_message", fail)
    response = post_json(
        as_user(client, users["alice"]), f"{API}/rooms/lobby/messages", {"payload": {}}
    )
    error_of(response, 503, "unavailable")


def test_unexpected_error_is_500_json_without_traceback(client, users, rooms, monkeypatch):
    def boom(*args):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(services, "history", boom)
    response = as_user(client, users["alice"]).get(f"{API}/rooms/lobby/messages")
    assert "secret detail" not in error_of(response, 500, "internal")


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_messages_wrong_method_is_405_json(client, users, rooms, method):
    response = getattr(as_user(client, users["alice"]), method)(f"{API}/rooms/lobby/messages")
    error_of(response, 405, "bad_frame")
    assert response["Allow"] == "GET, POST"


# -- GET rooms/<room>/presence -------------------------------------------------------------


def test_presence_of_an_empty_room(client, users, rooms):
    response = as_user(client, users["alice"]).get(f"{API}/rooms/lobby/presence")
    assert response.status_code == 200
    assert response.json() == {"room": "lobby", "users": []}


async def test_presence_lists_users_online_with_their_connections(hub, users, rooms):
    sockets = [Socket(users["alice"]), Socket(users["alice"]), Socket(users["bob"])]
    for sock in sockets:
        await sock.open()
        await sock.join("lobby")
    client = Client()
    await sync_to_async(client.force_login)(users["carol"])
    response = await sync_to_async(client.get)(f"{API}/rooms/lobby/presence")
    assert response.status_code == 200
    assert response.json() == {
        "room": "lobby",
        "users": [
            {"id": users["alice"].pk, "name": "alice", "connections": 2},
            {"id": users["bob"].pk, "name": "bob", "connections": 1},
        ],
    }
    for sock in sockets:
        await sock.close()


@pytest.mark.parametrize(
    ("user", "room", "status", "code"),
    [
        (None, "lobby", 401, "unauthorized"),
        ("carol", "team", 403, "forbidden"),
        ("alice", "nowhere", 404, "room_not_found"),
        ("alice", "-bad", 400, "invalid_room"),
    ],
)
def test_presence_errors(client, users, rooms, user, room, status, code):
    if user:
        client.force_login(users[user])
    error_of(client.get(f"{API}/rooms/{room}/presence"), status, code)


def test_presence_refuses_post(client, users, rooms):
    error_of(as_user(client, users["alice"]).post(f"{API}/rooms/lobby/presence"), 405, "bad_frame")


# -- POST publish (server key) -------------------------------------------------------------


@pytest.fixture
def api_key(settings):
    settings.REALTIME_API_KEY = KEY
    return KEY


def publish_request(body, key=KEY, client=None, **extra):
    if key is not None:
        extra["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return post_json(client or Client(), f"{API}/publish", body, **extra)


def test_publish_with_the_server_key(api_key, rooms, broadcasts):
    response = publish_request({"room": "lobby", "payload": {"text": "deploy done"}})
    assert response.status_code == 201, response.content
    message = response.json()
    assert (message["seq"], message["sender"]) == (1, None)
    assert broadcasts == [message]


def test_publish_needs_no_csrf_token(api_key, users, rooms, broadcasts):
    client, _ = csrf_client(users["alice"])
    response = publish_request({"room": "lobby", "payload": {}}, client=client)
    assert response.status_code == 201


async def test_publish_reaches_joined_sockets(api_key, hub, users, rooms):
    alice = Socket(users["alice"])
    await alice.open()
    await alice.join("lobby")
    response = await sync_to_async(publish_request)({"room": "lobby", "payload": {"n": 1}})
    assert response.status_code == 201
    [frame] = await alice.messages(1)
    assert (frame["sender"], frame["payload"]) == (None, {"n": 1})
    await alice.close()


@pytest.mark.parametrize("configured", [None, ""])
def test_publish_is_disabled_without_a_key(settings, rooms, configured):
    if configured is None:
        del settings.REALTIME_API_KEY
    else:
        settings.REALTIME_API_KEY = configured
    response = publish_request({"room": "lobby", "payload": {}}, key="")
    assert "REALTIME_API_KEY" in error_of(response, 403, "forbidden")
    assert Message.objects.count() == 0


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", KEY],
)
def test_publish_with_a_wrong_key_is_unauthorized(api_key, rooms, authorization):
    extra = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    response = publish_request({"room": "lobby", "payload": {}}, key=None, **extra)
    error_of(response, 401, "unauthorized")
    assert response["WWW-Authenticate"] == 'Bearer realm="realtime"'
    assert Message.objects.count() == 0


def test_publish_compares_the_key_in_constant_time(api_key, rooms, broadcasts, monkeypatch):
    calls = []
    compare_digest = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(views.hmac, "compare_digest", spy)
    publish_request({"room": "lobby", "payload": {}}, key="guess")
    publish_request({"room": "lobby", "payload": {}})
    assert calls == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_publish_accepts_a_non_ascii_key(settings, rooms, broadcasts):
    settings.REALTIME_API_KEY = "clé"
    assert publish_request({"room": "lobby", "payload": {}}, key="cle").status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("{oops", 400, "bad_frame"),
        ('"lobby"', 400, "bad_frame"),
        ({"payload": {}}, 400, "invalid_room"),
        ({"room": 5, "payload": {}}, 400, "invalid_room"),
        ({"room": "Lobby", "payload": {}}, 400, "invalid_room"),
        ({"room": "nowhere", "payload": {}}, 404, "room_not_found"),
        ({"room": "lobby"}, 400, "bad_frame"),
        ({"room": "lobby", "payload": [1]}, 400, "bad_frame"),
        ({"room": "lobby", "payload": {"big": "x" * 70_000}}, 413, "too_large"),
    ],
)
def test_publish_bad_bodies(api_key, rooms, body, status, code):
    error_of(publish_request(body), status, code)
    assert Message.objects.count() == 0


def test_publish_to_an_archived_room_is_forbidden(api_key, rooms):
    Room.objects.filter(slug="lobby").update(archived=True)
    error_of(publish_request({"room": "lobby", "payload": {}}), 403, "forbidden")


def test_publish_broadcast_failure_is_503(api_key, rooms, layer_down):
    error_of(publish_request({"room": "lobby", "payload": {}}), 503, "unavailable")


def test_publish_refuses_get(api_key):
    response = Client().get(f"{API}/publish", HTTP_AUTHORIZATION=f"Bearer {KEY}")
    error_of(response, 405, "bad_frame")
    assert response["Allow"] == "POST"


def test_api_broadcasts_before_responding_under_atomic_requests(
    api_key, rooms, layer_down, monkeypatch
):
    # With ATOMIC_REQUESTS the broadcast would wait for the view's commit; the API opts out,
    # so a failing broadcast is still reported to this request.
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    error_of(publish_request({"room": "lobby", "payload": {}}), 503, "unavailable")


# -- anything else under api/ ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/nope", "/rooms/lobby/messages/", "/rooms/lobby", "/rooms/lobby/other"]
)
def test_unknown_api_paths_are_json_404(client, users, path):
    error_of(as_user(client, users["alice"]).get(API + path), 404, "unknown_type")
