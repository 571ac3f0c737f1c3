import threading

import pytest
from django.contrib.auth.models import AnonymousUser
from django.db import IntegrityError, connection, transaction

from realtime import services
from realtime.errors import Forbidden, RoomNotFound, Unauthorized
from realtime.models import Membership, Message, Room

pytestmark = pytest.mark.django_db


def send(room, user, text="hi", client_msg_id=None):
    return services.append_message(room, user, {"text": text}, client_msg_id)


def test_seqs_start_at_one_and_follow_head(rooms, users):
    seqs = [send("lobby", users["alice"]).message["seq"] for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert Room.objects.get(slug="lobby").head_seq == 3


def test_seqs_are_per_room(rooms, users):
    send("lobby", users["alice"])
    assert send("team", users["alice"]).message["seq"] == 1


def test_message_dict_shape(rooms, users):
    message = send("lobby", users["alice"], "hello").message
    assert message["room"] == "lobby"
    assert message["sender"] == {"id": users["alice"].pk, "name": "alice"}
    assert message["payload"] == {"text": "hello"}
    assert message["sent_at"].endswith("Z")
    assert Message.objects.get(pk=message["id"]).seq == message["seq"]


def test_retry_with_client_msg_id_returns_original(rooms, users):
    first = send("lobby", users["alice"], "once", client_msg_id="m-1")
    again = send("lobby", users["alice"], "once", client_msg_id="m-1")
    assert first.created and not again.created
    assert again.message["seq"] == first.message["seq"]
    assert again.message["id"] == first.message["id"]
    assert Message.objects.count() == 1
    # The duplicate gave its seq back: the next message is contiguous.
    assert send("lobby", users["alice"]).message["seq"] == 2


def test_same_client_msg_id_from_another_user_is_a_new_message(rooms, users):
    send("lobby", users["alice"], client_msg_id="m-1")
    assert send("lobby", users["bob"], client_msg_id="m-1").created


def test_refused_send_allocates_no_seq(rooms, users):
    with pytest.raises(Forbidden):
        send("team", users["carol"])
    assert Room.objects.get(slug="team").head_seq == 0
    assert send("team", users["alice"]).message["seq"] == 1


def test_unknown_room(rooms, users):
    with pytest.raises(RoomNotFound):
        send("nope", users["alice"])


def test_server_publish_has_no_sender(rooms):
    result = services.append_message("news", None, {"text": "hear ye"})
    assert result.message["sender"] is None


@pytest.mark.django_db(transaction=True)
def test_concurrent_allocation_from_threads_never_duplicates_or_skips(rooms, users):
    per_thread, threads = 25, 4
    seqs: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker():
        try:
            start.wait(timeout=10)
            for _ in range(per_thread):
                seq = send("lobby", users["alice"]).message["seq"]
                with lock:
                    seqs.append(seq)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not errors
    assert sorted(seqs) == list(range(1, per_thread * threads + 1))
    stored = list(Message.objects.filter(room__slug="lobby").values_list("seq", flat=True))
    assert sorted(stored) == sorted(seqs)


# -- authorisation --------------------------------------------------------------------------

CASES = [
    # room, user, can read, can send
    ("lobby", "carol", True, True),
    ("lobby", "anon", False, False),
    ("team", "alice", True, True),
    ("team", "carol", False, False),
    ("team", "root", True, True),
    ("news", "carol", True, False),
    ("news", "staff", True, True),
    ("news", "anon", False, False),
]


def user_for(users, name):
    return AnonymousUser() if name == "anon" else users[name]


@pytest.mark.parametrize(("room", "who", "read", "write"), CASES)
def test_authorisation_matrix(rooms, users, room, who, read, write):
    user = user_for(users, who)
    assert services.can_read(rooms[room], user) is read
    if write:
        services.authorize(rooms[room], user, send=True)
    else:
        with pytest.raises((Forbidden, Unauthorized)):
            services.authorize(rooms[room], user, send=True)


def test_anonymous_gets_unauthorized_not_forbidden(rooms):
    with pytest.raises(Unauthorized):
        services.authorize(rooms["lobby"], AnonymousUser(), send=False)


def test_anonymous_read_setting_opens_public_and_announce_only(rooms, settings):
    settings.REALTIME_ALLOW_ANONYMOUS_READ = True
    anon = AnonymousUser()
    assert services.can_read(rooms["lobby"], anon)
    assert services.can_read(rooms["news"], anon)
    assert not services.can_read(rooms["team"], anon)
    with pytest.raises(Unauthorized):
        services.authorize(rooms["lobby"], anon, send=True)


def test_moderator_posts_in_announce_room(rooms, users):
    Membership.objects.create(room=rooms["news"], user=users["carol"], role="moderator")
    services.authorize(rooms["news"], users["carol"], send=True)


def test_banned_member_is_refused_even_in_public_room(rooms, users):
    Membership.objects.create(room=rooms["lobby"], user=users["carol"], banned=True)
    with pytest.raises(Forbidden, match="banned"):
        services.authorize(rooms["lobby"], users["carol"], send=False)


def test_archived_room_refuses_everyone(rooms, users):
    rooms["lobby"].archived = True
    rooms["lobby"].save()
    assert rooms["lobby"].archived_at is not None
    with pytest.raises(Forbidden, match="archived"):
        services.join("lobby", users["alice"], None, None)
    with pytest.raises(Forbidden):
        send("lobby", users["alice"])


# -- join recovery and history -------------------------------------------------------------


def fill(room, user, n):
    for i in range(n):
        send(room, user, f"m{i + 1}")


def test_join_without_after_seq_replays_nothing(rooms, users):
    fill("lobby", users["alice"], 3)
    result = services.join("lobby", users["bob"], None, None)
    assert (result.head, result.recovered, result.messages) == (3, False, [])


@pytest.mark.parametrize(
    ("room", "user", "can_send"),
    [
        ("lobby", "carol", True),  # public, not a member
        ("team", "alice", True),  # private, member
        ("news", "bob", False),  # announce, not a member
        ("news", "staff", True),
        ("team", "root", True),  # superuser
    ],
)
def test_join_reads_the_room_and_the_membership_in_one_query(
    rooms, users, room, user, can_send, django_assert_num_queries
):
    with django_assert_num_queries(1):
        result = services.join(room, users[user], None, None)
    assert result.can_send is can_send


def _fields(instance):
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_join_read_returns_what_the_orm_returns(rooms, users):
    """The join's hand-written SQL (rawread.py) converts values as a queryset does: aware
    datetimes, bools, the same instances, on SQLite and (test_postgres) on PostgreSQL."""
    news = rooms["news"]
    Room.objects.filter(pk=news.pk).update(archived=True, epoch=3, head_seq=7)
    made = Membership.objects.create(room=news, user=users["carol"], role="moderator", banned=True)
    room, membership = services._room_and_membership("news", users["carol"])
    assert _fields(room) == _fields(Room.objects.get(pk=news.pk))
    assert room.archived is True and room.created_at.tzinfo is not None
    assert not room._state.adding and membership is not None and not membership._state.adding
    assert _fields(membership) == _fields(Membership.objects.get(pk=made.pk))
    assert membership.banned is True and membership.created_at.tzinfo is not None
    # Not a member, a superuser (never looked up) and anonymous: no membership.
    for user in (users["bob"], users["root"], AnonymousUser(), None):
        assert services._room_and_membership("news", user)[1] is None


def test_join_sees_a_moderator_ban_and_a_missing_room_in_its_one_query(rooms, users):
    news = rooms["news"]
    Membership.objects.create(room=news, user=users["carol"], role=Membership.Role.MODERATOR)
    assert services.join("news", users["carol"], None, None).can_send
    Membership.objects.filter(room=news, user=users["carol"]).update(banned=True)
    with pytest.raises(Forbidden, match="banned"):
        services.join("news", users["carol"], None, None)
    with pytest.raises(Forbidden, match="members only"):
        services.join("team", users["carol"], None, None)
    with pytest.raises(RoomNotFound):
        services.join("nowhere", users["carol"], None, None)


def test_join_with_after_seq_replays_the_gap(rooms, users):
    fill("lobby", users["alice"], 5)
    result = services.join("lobby", users["bob"], 2, 1)
    assert result.recovered
    assert [m["seq"] for m in result.messages] == [3, 4, 5]


def test_join_beyond_recovery_limit_is_not_recovered(rooms, users, settings):
    settings.REALTIME_RECOVERY_LIMIT = 2
    fill("lobby", users["alice"], 5)
    result = services.join("lobby", users["bob"], 2, None)
    assert (result.recovered, result.messages) == (False, [])


def test_join_with_other_epoch_is_not_recovered(rooms, users):
    fill("lobby", users["alice"], 2)
    assert not services.join("lobby", users["bob"], 1, 99).recovered


def test_join_ahead_of_head_is_not_recovered(rooms, users):
    fill("lobby", users["alice"], 2)
    assert not services.join("lobby", users["bob"], 10, None).recovered


def test_history_pages_backwards_ascending(rooms, users):
    fill("lobby", users["alice"], 10)
    newest = services.history("lobby", users["bob"], None, 4)
    assert [m["seq"] for m in newest] == [7, 8, 9, 10]
    older = services.history("lobby", users["bob"], 7, 4)
    assert [m["seq"] for m in older] == [3, 4, 5, 6]


def test_history_requires_read_access(rooms, users):
    with pytest.raises(Forbidden):
        services.history("team", users["carol"], None, 10)


def test_retracted_message_is_a_tombstone(rooms, users):
    fill("lobby", users["alice"], 2)
    Message.objects.filter(seq=1).update(retracted=True)
    first = services.history("lobby", users["bob"], None, 10)[0]
    assert first["seq"] == 1
    assert first["retracted"] is True
    assert first["payload"] is None


def test_history_after_seq_pages_forwards(rooms, users):
    fill("lobby", users["alice"], 10)
    assert [m["seq"] for m in services.history("lobby", users["bob"], None, 3, after_seq=4)] == [
        5,
        6,
        7,
    ]
    bounded = services.history("lobby", users["bob"], 7, 10, after_seq=4)
    assert [m["seq"] for m in bounded] == [5, 6]


# -- batches (group commit, writer.py) --------------------------------------------------------
# Outside a test transaction (transaction=True), as in the writer thread: on PostgreSQL they
# take the pipelined path (realtime/pgbatch.py; tests/test_postgres.py runs them there), on
# SQLite the ORM path. Inside one (the tests above), PostgreSQL takes the ORM path too.

batch_db = pytest.mark.django_db(transaction=True)


@batch_db
def test_batches_take_the_pipelined_path_exactly_on_postgresql(rooms, users, monkeypatch):
    from realtime import pgbatch

    calls = []
    real_store = pgbatch.store
    monkeypatch.setattr(pgbatch, "store", lambda *a: calls.append(1) or real_store(*a))
    services.append_messages([services.Append("lobby", users["alice"], {"n": 1})])
    assert len(calls) == (1 if connection.vendor == "postgresql" else 0)
    with transaction.atomic():  # a caller's transaction: the ORM path nests in it
        services.append_messages([services.Append("lobby", users["alice"], {"n": 2})])
    assert len(calls) == (1 if connection.vendor == "postgresql" else 0)
    assert Room.objects.get(slug="lobby").head_seq == 2


@batch_db
def test_batch_allocates_contiguous_seqs_per_room_in_list_order(rooms, users):
    alice, bob = users["alice"], users["bob"]
    send("lobby", alice)  # lobby head 1
    batch = [
        services.Append("lobby", alice, {"n": 1}),
        services.Append("team", bob, {"n": 2}),
        services.Append("lobby", bob, {"n": 3}),
        services.Append("team", alice, {"n": 4}),
        services.Append("lobby", None, {"n": 5}),
    ]
    results = services.append_messages(batch)
    seqs = [(r.message["room"], r.message["seq"], r.message["payload"]["n"]) for r in results]
    assert seqs == [
        ("lobby", 2, 1),
        ("team", 1, 2),
        ("lobby", 3, 3),
        ("team", 2, 4),
        ("lobby", 4, 5),
    ]
    assert all(r.created for r in results)
    assert Room.objects.get(slug="lobby").head_seq == 4
    assert Room.objects.get(slug="team").head_seq == 2
    stored = Message.objects.filter(room__slug="lobby").order_by("seq")
    assert [m.seq for m in stored] == [1, 2, 3, 4]
    assert [r.message["id"] for r in results] == [
        Message.objects.get(room__slug=r.message["room"], seq=r.message["seq"]).pk for r in results
    ]


@batch_db
def test_refusals_in_a_batch_take_no_seq_and_spare_the_others(rooms, users):
    Membership.objects.create(room=rooms["lobby"], user=users["bob"], banned=True)
    batch = [
        services.Append("team", users["carol"], {"n": 1}),  # not a member of the private room
        services.Append("lobby", users["alice"], {"n": 2}),
        services.Append("nope", users["alice"], {"n": 3}),  # no such room
        services.Append("lobby", users["bob"], {"n": 4}),  # banned
        services.Append("news", users["alice"], {"n": 5}),  # announce: staff and moderators
        services.Append("lobby", AnonymousUser(), {"n": 6}),
        services.Append("team", users["alice"], {"n": 7}),
    ]
    results = services.append_messages(batch)
    kinds = [type(r).__name__ for r in results]
    assert kinds == [
        "Forbidden",
        "AppendResult",
        "RoomNotFound",
        "Forbidden",
        "Forbidden",
        "Unauthorized",
        "AppendResult",
    ]
    assert "banned" in str(results[3])
    assert results[1].message["seq"] == 1 and results[6].message["seq"] == 1
    assert Room.objects.get(slug="lobby").head_seq == 1
    assert Room.objects.get(slug="news").head_seq == 0


@batch_db
def test_retries_in_and_across_batches_return_the_original(rooms, users):
    alice = users["alice"]
    first = send("lobby", alice, "stored before", client_msg_id="a")
    batch = [
        services.Append("lobby", alice, {"text": "retry of a"}, "a"),
        services.Append("lobby", alice, {"text": "b"}, "b"),
        services.Append("lobby", alice, {"text": "b again"}, "b"),
        services.Append("lobby", users["bob"], {"text": "bob's b"}, "b"),
    ]
    results = services.append_messages(batch)
    assert [r.created for r in results] == [False, True, False, True]
    assert results[0].message == first.message
    assert results[2].message == results[1].message
    assert results[1].message["payload"] == {"text": "b"}
    assert [r.message["seq"] for r in results] == [1, 2, 2, 3]
    assert Message.objects.count() == 3
    assert Room.objects.get(slug="lobby").head_seq == 3


@batch_db
def test_a_failing_batch_rolls_back_every_seq(rooms, users):
    # A row the head does not know about (seq 2) makes the batch's INSERT fail.
    Message.objects.create(room=rooms["lobby"], seq=2, payload={})
    batch = [services.Append("lobby", users["alice"], {"n": n}) for n in range(3)]
    with pytest.raises(IntegrityError):
        services.append_messages(batch)
    assert Room.objects.get(slug="lobby").head_seq == 0
    assert Message.objects.count() == 1
    # The connection is usable again (the failed transaction was rolled back).
    Message.objects.filter(seq=2).delete()
    assert send("lobby", users["alice"]).message["seq"] == 1


def test_join_many_answers_each_request_as_join_does_in_one_query(
    rooms, users, django_assert_num_queries
):
    news = rooms["news"]
    Membership.objects.create(room=news, user=users["carol"], role=Membership.Role.MODERATOR)
    Membership.objects.create(room=news, user=users["bob"], banned=True)
    fill("lobby", users["alice"], 2)
    requests = [
        ("news", users["carol"], None, None),  # moderator: may send
        ("news", users["alice"], None, None),  # not a member: reads only
        ("news", users["bob"], None, None),  # banned
        ("team", users["carol"], None, None),  # private, not a member
        ("team", users["alice"], None, None),
        ("lobby", users["bob"], 1, None),  # recovers seq 2
        ("lobby", AnonymousUser(), None, None),
        ("nowhere", users["carol"], None, None),
        ("team", users["root"], None, None),  # superuser: no membership read
    ]
    alone = []
    for request in requests:
        try:
            alone.append(services.join(*request))
        except Exception as exc:
            alone.append(exc)
    with django_assert_num_queries(2):  # the shared read, and lobby's replay
        together = services.join_many(requests)
    assert [type(r) for r in together] == [type(r) for r in alone]
    for ours, single in zip(together, alone, strict=True):
        if isinstance(single, Exception):
            assert str(ours) == str(single)
        else:
            assert ours == single
    assert together[0].can_send and not together[1].can_send
    assert isinstance(together[2], Forbidden) and "banned" in str(together[2])
    assert isinstance(together[7], RoomNotFound)
    assert [m["seq"] for m in together[5].messages] == [2]
