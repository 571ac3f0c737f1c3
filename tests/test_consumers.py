import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from realtime import broker, services
from realtime.consumers import RealtimeConsumer
from realtime.models import Room

from .wsclient import TIMEOUT, Client, error

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub")]

append = database_sync_to_async(services.append_message)


async def test_hello_names_user_and_protocol(users):
    client = Client(users["alice"])
    hello = await client.open()
    assert hello == {
        "type": "hello",
        "protocol": 1,
        "user": {"id": users["alice"].pk, "name": "alice"},
        "heartbeat": 25,
    }
    await client.close()


async def test_hello_for_anonymous_has_null_user():
    client = Client(AnonymousUser())
    assert (await client.open())["user"] is None
    await client.close()


async def test_join_acks_with_head_epoch_and_presence(connect, users, rooms):
    alice = await connect(users["alice"])
    ack = await alice.join("lobby")
    assert ack == {
        "type": "ack",
        "ref": "j-lobby",
        "room": "lobby",
        "seq": 0,
        "epoch": 1,
        "recovered": False,
    }


async def test_join_after_seq_replays_missed_messages_in_order(connect, users, rooms):
    for i in range(5):
        await append("lobby", users["bob"], {"text": str(i)})
    alice = await connect(users["alice"])
    ack = await alice.join("lobby", after_seq=2, epoch=1)
    assert (ack["seq"], ack["recovered"]) == (5, True)
    replay = await alice.messages(3)
    assert [m["seq"] for m in replay] == [3, 4, 5]
    assert [m["payload"]["text"] for m in replay] == ["2", "3", "4"]
    await alice.assert_usable()


async def test_join_beyond_recovery_limit_is_not_recovered(connect, users, rooms, settings):
    settings.REALTIME_RECOVERY_LIMIT = 1
    for i in range(3):
        await append("lobby", users["bob"], {"text": str(i)})
    alice = await connect(users["alice"])
    ack = await alice.join("lobby", after_seq=0)
    assert (ack["seq"], ack["recovered"]) == (3, False)
    await alice.assert_usable()  # no replayed message came before the pong


async def test_send_acks_then_every_member_gets_message(connect, users, rooms):
    alice, bob = await connect(users["alice"]), await connect(users["bob"])
    alice_tab2 = await connect(users["alice"])
    for client in (alice, bob, alice_tab2):
        await client.join("lobby")
    ack = await alice.request(type="send", room="lobby", ref="s1", payload={"text": "hi"})
    assert ack["type"] == "ack" and ack["ref"] == "s1" and ack["seq"] == 1
    for client in (alice, bob, alice_tab2):
        (message,) = await client.messages(1)
        assert message["seq"] == 1 and message["id"] == ack["id"]
        assert message["sender"] == {"id": users["alice"].pk, "name": "alice"}
        assert message["payload"] == {"text": "hi"}


async def test_send_retry_with_client_msg_id_returns_original_and_no_duplicate(
    connect, users, rooms
):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    frame = {"type": "send", "room": "lobby", "payload": {"text": "once"}, "client_msg_id": "c1"}
    first = await alice.request(ref="a", **frame)
    (message,) = await alice.messages(1)
    retry = await alice.request(ref="b", **frame)
    assert (retry["seq"], retry["id"]) == (first["seq"], first["id"]) == (1, message["id"])
    nxt = await alice.request(type="send", room="lobby", ref="c", payload={"text": "two"})
    assert nxt["seq"] == 2
    (after,) = await alice.messages(1)
    assert after["seq"] == 2  # the retry produced no second message frame


async def test_leave_stops_delivery(connect, users, rooms):
    alice, bob = await connect(users["alice"]), await connect(users["bob"])
    await alice.join("lobby")
    await bob.join("lobby")
    assert await bob.request(type="leave", room="lobby", ref="l") == {
        "type": "ack",
        "ref": "l",
        "room": "lobby",
    }
    await alice.request(type="send", room="lobby", ref="s", payload={"text": "x"})
    await alice.messages(1)
    await bob.assert_usable()
    assert await bob.comm.receive_nothing(timeout=0.2)


async def test_history_returns_messages_ascending(connect, users, rooms):
    for i in range(4):
        await append("lobby", users["bob"], {"text": str(i)})
    alice = await connect(users["alice"])
    ack = await alice.request(type="history", room="lobby", ref="h", before_seq=4, limit=2)
    assert ack["type"] == "ack" and ack["ref"] == "h"
    assert [m["seq"] for m in ack["messages"]] == [2, 3]


async def test_typing_reaches_others_but_not_sender(connect, users, rooms):
    alice, bob = await connect(users["alice"]), await connect(users["bob"])
    await alice.join("lobby")
    await bob.join("lobby")
    await alice.send(type="typing", room="lobby")
    assert await bob.recv() == {
        "type": "typing",
        "room": "lobby",
        "sender": {"id": users["alice"].pk, "name": "alice"},
    }
    await alice.assert_usable()  # pong came first: alice got no typing frame of her own


async def test_ping_pong(connect, users):
    alice = await connect(users["alice"])
    await alice.assert_usable()
    assert await alice.request(type="ping") == {"type": "pong"}


# -- errors: every fault gets an error frame and the connection stays usable ---------------


@pytest.mark.parametrize(
    ("text", "code", "ref"),
    [
        ("{not json", "bad_frame", None),
        ("[]", "bad_frame", None),
        ('{"ref": "r"}', "bad_frame", "r"),
        ('{"type": "dance", "ref": "r"}', "unknown_type", "r"),
        ('{"type": "join", "room": "NOPE!", "ref": "r"}', "invalid_room", "r"),
        ('{"type": "join", "room": "lobby", "after_seq": "x", "ref": "r"}', "bad_frame", "r"),
        ('{"type": "send", "room": "lobby", "payload": 3, "ref": "r"}', "bad_frame", "r"),
        ('{"type": "send", "room": "lobby", "payload": {}, "ref": "r"}', "not_joined", "r"),
        ('{"type": "leave", "room": "lobby", "ref": "r"}', "not_joined", "r"),
        ('{"type": "typing", "room": "lobby"}', "not_joined", None),
        ('{"type": "join", "room": "ghost", "ref": "r"}', "room_not_found", "r"),
        ('{"type": "join", "room": "team", "ref": "r"}', "forbidden", "r"),
        ('{"type": "history", "room": "team", "ref": "r"}', "forbidden", "r"),
    ],
)
async def test_bad_frames_answered_with_error(connect, users, rooms, text, code, ref):
    carol = await connect(users["carol"])
    await carol.comm.send_to(text_data=text)
    error(code, ref)(await carol.recv())
    await carol.assert_usable()


async def test_join_twice_is_bad_frame(connect, users, rooms):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    error("bad_frame", "again")(await alice.request(type="join", room="lobby", ref="again"))
    await alice.assert_usable()


async def test_oversize_payload_is_too_large(connect, users, rooms, settings):
    settings.REALTIME_MAX_PAYLOAD_BYTES = 1000
    alice = await connect(users["alice"])
    await alice.join("lobby")
    reply = await alice.request(type="send", room="lobby", ref="big", payload={"t": "x" * 5000})
    error("too_large", None)(reply)  # refused before parsing, so the ref is unknown
    reply = await alice.request(type="send", room="lobby", ref="mid", payload={"t": "x" * 1500})
    error("too_large", "mid")(reply)
    await alice.assert_usable()


async def test_binary_frame_is_bad_frame(connect, users):
    alice = await connect(users["alice"])
    await alice.comm.send_to(bytes_data=b"\x00\x01")
    error("bad_frame")(await alice.recv())
    await alice.assert_usable()


async def test_plain_user_cannot_post_in_announce_room(connect, users, rooms):
    carol, staff = await connect(users["carol"]), await connect(users["staff"])
    await carol.join("news")
    await staff.join("news")
    reply = await carol.request(type="send", room="news", ref="s", payload={"text": "me"})
    error("forbidden", "s")(reply)
    ack = await staff.request(type="send", room="news", ref="s", payload={"text": "news"})
    assert ack["seq"] == 1
    assert (await carol.messages(1))[0]["payload"] == {"text": "news"}


async def test_anonymous_is_unauthorized_unless_read_allowed(connect, rooms, settings):
    anon = await connect(AnonymousUser())
    error("unauthorized", "j")(await anon.request(type="join", room="lobby", ref="j"))
    settings.REALTIME_ALLOW_ANONYMOUS_READ = True
    await anon.join("lobby")
    reply = await anon.request(type="send", room="lobby", ref="s", payload={"text": "x"})
    error("unauthorized", "s")(reply)


async def test_archived_room_refuses_join_and_send(connect, users, rooms):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    await database_sync_to_async(Room.objects.filter(slug="lobby").update)(archived=True)
    reply = await alice.request(type="send", room="lobby", ref="s", payload={"text": "x"})
    error("forbidden", "s")(reply)
    bob = await connect(users["bob"])
    error("forbidden", "j")(await bob.request(type="join", room="lobby", ref="j"))


# -- the ordering guarantee ------------------------------------------------------------------


async def persist(n, user):
    """Persist n lobby messages without broadcasting them (as if the layer dropped them)."""
    return [(await append("lobby", user, {"text": f"m{i}"})).message for i in range(n)]


async def test_dropped_broadcasts_are_filled_from_the_database(connect, users, rooms):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    messages = await persist(4, users["bob"])
    last = messages[-1]
    await broker.publish_message("lobby", last["seq"], services.message_frame(last))
    assert [m["seq"] for m in await alice.messages(4)] == [1, 2, 3, 4]
    await alice.assert_usable()


async def test_sessions_missing_the_same_broadcasts_share_one_read(
    connect, users, rooms, monkeypatch
):
    clients = [await connect(users[name]) for name in ("alice", "bob", "alice", "bob", "alice")]
    for client in clients:
        await client.join("lobby")
    messages = await persist(3, users["bob"])
    reads = []
    real = services.messages_between

    def counted(*args):
        reads.append(args)
        return real(*args)

    monkeypatch.setattr(services, "messages_between", counted)
    last = messages[-1]
    await broker.publish_message("lobby", last["seq"], services.message_frame(last))
    for client in clients:
        got = await client.messages(3)
        assert [m["seq"] for m in got] == [1, 2, 3]
        assert [m["payload"] for m in got] == [m["payload"] for m in messages]
    assert reads == [("lobby", 0, 2)]  # one read for the five sessions, up to the seq they hold
    await clients[0].assert_usable()


async def test_reordered_and_duplicated_broadcasts_arrive_once_in_order(connect, users, rooms):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    messages = await persist(5, users["bob"])
    for index in (2, 0, 4, 2, 1, 3, 0, 4):
        m = messages[index]
        await broker.publish_message("lobby", m["seq"], services.message_frame(m))
    received = await alice.messages(5)
    assert [m["seq"] for m in received] == [1, 2, 3, 4, 5]
    assert [m["payload"]["text"] for m in received] == ["m0", "m1", "m2", "m3", "m4"]
    await alice.assert_usable()


async def test_broadcast_older_than_join_head_is_not_repeated(connect, users, rooms):
    messages = await persist(2, users["bob"])
    alice = await connect(users["alice"])
    await alice.join("lobby", after_seq=0)
    assert [m["seq"] for m in await alice.messages(2)] == [1, 2]
    for m in messages:
        await broker.publish_message("lobby", m["seq"], services.message_frame(m))
    await alice.assert_usable()
    assert await alice.comm.receive_nothing(timeout=0.2)


async def test_deleted_message_leaves_no_stall(connect, users, rooms):
    from realtime.models import Message

    alice = await connect(users["alice"])
    await alice.join("lobby")
    messages = await persist(3, users["bob"])
    await database_sync_to_async(Message.objects.filter(seq=2).delete)()
    assert await alice.recv() == {"type": "retract", "room": "lobby", "seq": 2}
    last = messages[-1]
    await broker.publish_message("lobby", last["seq"], services.message_frame(last))
    assert [m["seq"] for m in await alice.messages(2)] == [1, 3]


# -- the full ASGI stack: session cookie and origin check -----------------------------------


async def full_stack(headers):
    from project.asgi import application

    comm = WebsocketCommunicator(application, "/ws/", headers=headers)
    return comm, await comm.connect(timeout=TIMEOUT)


async def session_cookie(user):
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    def make():
        store = SessionStore()
        store[SESSION_KEY] = str(user.pk)
        store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        store[HASH_SESSION_KEY] = user.get_session_auth_hash()
        store.save()
        return store.session_key

    return f"sessionid={await database_sync_to_async(make)()}".encode()


async def test_session_cookie_authenticates_the_socket(users):
    cookie = await session_cookie(users["alice"])
    comm, (connected, _) = await full_stack(
        [(b"cookie", cookie), (b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]
    )
    assert connected
    hello = json.loads(await comm.receive_from(timeout=TIMEOUT))
    assert hello["user"]["name"] == "alice"
    await comm.disconnect()


async def test_foreign_origin_is_rejected_even_with_a_valid_cookie(users):
    cookie = await session_cookie(users["alice"])
    _, (connected, _) = await full_stack(
        [(b"cookie", cookie), (b"origin", b"http://evil.example"), (b"host", b"127.0.0.1")]
    )
    assert not connected


async def test_failed_gap_fill_closes_instead_of_skipping(connect, users, rooms, monkeypatch):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    messages = await persist(3, users["bob"])

    def broken(*args):
        raise RuntimeError("database went away")

    monkeypatch.setattr(services, "messages_between", broken)
    last = messages[-1]
    await broker.publish_message("lobby", last["seq"], services.message_frame(last))
    closed = await alice.comm.receive_output(timeout=TIMEOUT)
    assert closed == {"type": "websocket.close", "code": 1011}


async def test_typing_needs_send_rights(connect, users, rooms):
    carol = await connect(users["carol"])
    await carol.join("news")
    error("forbidden", None)(await carol.request(type="typing", room="news"))
    await carol.assert_usable()


async def test_send_is_not_acked_when_the_broadcast_fails(connect, users, rooms, monkeypatch):
    alice, bob = await connect(users["alice"]), await connect(users["bob"])
    await alice.join("lobby")
    await bob.join("lobby")
    real_publish = broker.publish_message

    async def layer_down(*args):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(broker, "publish_message", layer_down)
    frame = {"type": "send", "room": "lobby", "payload": {"text": "x"}, "client_msg_id": "k1"}
    error("unavailable", "a")(await alice.request(ref="a", **frame))
    monkeypatch.setattr(broker, "publish_message", real_publish)
    retry = await alice.request(ref="b", **frame)
    assert (retry["type"], retry["seq"]) == ("ack", 1)  # the stored message, not a new one
    for client in (alice, bob):
        assert [m["seq"] for m in await client.messages(1)] == [1]


# -- presence ------------------------------------------------------------------------------


def person(user, connections=None):
    data = {"id": user.pk, "name": user.username}
    return data if connections is None else {**data, "connections": connections}


async def join_with_presence(client, room):
    ack = await client.request(type="join", room=room, ref="p")
    assert ack["type"] == "ack"
    state = await client.recv()
    assert state["type"] == "presence_state"
    return state


async def test_presence_state_lists_users_once_with_connection_counts(connect, users, rooms):
    alice1, alice2 = await connect(users["alice"]), await connect(users["alice"])
    await alice1.join("lobby")
    await alice2.join("lobby")
    bob = await connect(users["bob"])
    state = await join_with_presence(bob, "lobby")
    assert state["users"] == [person(users["alice"], 2), person(users["bob"], 1)]


async def test_presence_diff_on_first_join_and_last_leave_only(connect, users, rooms):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    bob1 = await connect(users["bob"])
    await bob1.join("lobby")
    diff = await alice.recv(skip=())
    assert diff == {
        "type": "presence_diff",
        "room": "lobby",
        "joins": [person(users["bob"])],
        "leaves": [],
    }
    bob2 = await connect(users["bob"])
    await bob2.join("lobby")  # a second tab: no diff
    await bob2.request(type="leave", room="lobby", ref="x")
    await bob1.close()  # the last connection goes: bob leaves
    diff = await alice.recv(skip=())
    assert (diff["joins"], diff["leaves"]) == ([], [person(users["bob"])])


async def test_anonymous_readers_are_not_in_presence(connect, users, rooms, settings):
    from django.contrib.auth.models import AnonymousUser

    settings.REALTIME_ALLOW_ANONYMOUS_READ = True
    anon = await connect(AnonymousUser())
    state = await join_with_presence(anon, "lobby")
    assert state["users"] == []


async def test_typing_is_rate_limited_per_user(connect, users, rooms, settings):
    settings.REALTIME_TYPING_RATE = "2/60s"
    alice, alice_tab = await connect(users["alice"]), await connect(users["alice"])
    bob = await connect(users["bob"])
    for client in (alice, alice_tab, bob):
        await client.join("lobby")
    await alice.send(type="typing", room="lobby")
    await alice_tab.send(type="typing", room="lobby")  # the same user: shares the limit
    refused = await alice.request(type="typing", room="lobby", ref="t3")
    error("rate_limited", "t3")(refused)
    assert 0 < refused["retry_after"] <= 30
    typing = [await bob.recv(), await bob.recv()]
    assert [f["type"] for f in typing] == ["typing", "typing"]
    await bob.assert_usable()  # the third one was not relayed


async def test_a_frame_for_a_socket_that_just_closed_is_dropped_quietly():
    from autobahn.exception import Disconnected

    consumer = RealtimeConsumer()

    async def closed_protocol(message):
        raise Disconnected("Attempt to send on a closed protocol")

    consumer.base_send = closed_protocol
    await consumer._emit('{"type":"message"}')  # no exception: the client resumes later

    async def broken(message):
        raise ValueError("a real bug")

    consumer.base_send = broken
    with pytest.raises(ValueError):
        await consumer._emit('{"type":"message"}')


async def test_a_closed_connection_is_freed_without_the_garbage_collector(users, rooms):
    """The consumer and its session refer to each other until the socket is done; then the
    cycle is broken, so a thousand clients leaving at once do not await a full collection."""
    import gc
    import weakref

    client = Client(users["alice"])
    await client.open()
    await client.join("lobby")
    (session,) = (s for s in broker.get_hub().sessions if s.user == users["alice"])
    freed = weakref.ref(session)
    del session
    gc.disable()
    try:
        await client.close()
        assert freed() is None
    finally:
        gc.enable()
