"""Moderation reaches live connections: removed, retract, announcements, admin logging."""

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.contrib.admin.models import LogEntry
from django.test import Client as HttpClient

from realtime import moderation, services
from realtime.models import Membership, Message, Room

from .wsclient import error

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub")]

db = database_sync_to_async


async def removed(client):
    frame = await client.recv()
    assert frame["type"] == "removed", frame
    return frame


async def test_ban_removes_the_member_and_stops_delivery(connect, users, rooms):
    carol, alice = await connect(users["carol"]), await connect(users["alice"])
    await carol.join("lobby")
    await alice.join("lobby")
    await db(Membership.objects.create)(room=rooms["lobby"], user=users["carol"], banned=True)
    assert await removed(carol) == {"type": "removed", "room": "lobby", "reason": "banned"}
    await alice.request(type="send", room="lobby", ref="s", payload={"text": "after"})
    await alice.messages(1)
    error("not_joined", "t")(await carol.request(type="send", room="lobby", ref="t", payload={}))
    await alice.assert_usable()  # alice was not removed


async def test_removing_a_private_member_removes_only_them(connect, users, rooms):
    alice, bob = await connect(users["alice"]), await connect(users["bob"])
    await alice.join("team")
    await bob.join("team")
    await db(Membership.objects.filter(room__slug="team", user=users["alice"]).delete)()
    assert (await removed(alice))["reason"] == "forbidden"
    await bob.assert_usable()


async def test_making_a_room_private_removes_non_members(connect, users, rooms):
    carol, alice = await connect(users["carol"]), await connect(users["alice"])
    await carol.join("lobby")
    await alice.join("lobby")
    await db(Membership.objects.create)(room=rooms["lobby"], user=users["alice"])
    await carol.assert_usable()  # a membership for someone else removes nobody

    def make_private():
        room = Room.objects.get(slug="lobby")
        room.kind = Room.Kind.PRIVATE
        room.save()

    await db(make_private)()
    assert (await removed(carol))["reason"] == "forbidden"
    await alice.request(type="send", room="lobby", ref="s", payload={"text": "members only"})
    assert (await alice.messages(1))[0]["payload"] == {"text": "members only"}


async def test_archive_removes_everyone_and_refuses_joins(connect, users, rooms):
    alice, bob = await connect(users["alice"]), await connect(users["bob"])
    await alice.join("lobby")
    await bob.join("lobby")

    def archive():
        room = Room.objects.get(slug="lobby")
        room.archived = True
        room.save()

    await db(archive)()
    for client in (alice, bob):
        assert (await removed(client))["reason"] == "archived"
    error("forbidden", "j")(await alice.request(type="join", room="lobby", ref="j"))


async def test_kick_removes_live_connections_who_may_rejoin(connect, users, rooms):
    bob = await connect(users["bob"])
    await bob.join("lobby")
    await db(moderation.kick)("lobby", users["bob"].pk)
    assert (await removed(bob))["reason"] == "kicked"
    await bob.join("lobby")


async def test_retract_reaches_clients_and_leaves_a_tombstone(connect, users, rooms):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    ack = await alice.request(type="send", room="lobby", ref="s", payload={"text": "oops"})
    await alice.messages(1)
    await db(moderation.retract)([ack["id"]])
    assert await alice.recv() == {"type": "retract", "room": "lobby", "seq": ack["seq"]}
    history = await alice.request(type="history", room="lobby", ref="h")
    (tombstone,) = history["messages"]
    assert tombstone["retracted"] is True and tombstone["payload"] is None


async def test_promotion_to_moderator_lets_a_member_post_in_an_announce_room(connect, users, rooms):
    carol = await connect(users["carol"])
    await carol.join("news")
    error("forbidden", "s")(
        await carol.request(type="send", room="news", ref="s", payload={"text": "x"})
    )
    await db(Membership.objects.create)(room=rooms["news"], user=users["carol"], role="moderator")
    await carol.assert_usable()
    ack = await carol.request(type="send", room="news", ref="s2", payload={"text": "news!"})
    assert ack["type"] == "ack"


# -- through the Django admin ----------------------------------------------------------------


def admin_client(user):
    client = HttpClient()
    client.force_login(user)
    return client


async def test_admin_delete_retracts_and_is_logged(connect, users, rooms):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    ack = await alice.request(type="send", room="lobby", ref="s", payload={"text": "bad"})
    await alice.messages(1)
    http = await sync_to_async(admin_client)(users["root"])
    url = f"/admin/realtime/message/{ack['id']}/delete/"
    response = await sync_to_async(http.post)(url, {"post": "yes"})
    assert response.status_code == 302
    assert await alice.recv() == {"type": "retract", "room": "lobby", "seq": ack["seq"]}
    stored = await db(Message.objects.get)(pk=ack["id"])
    assert stored.retracted and stored.seq == ack["seq"]  # a tombstone, not a hole
    assert await db(LogEntry.objects.filter(object_id=str(ack["id"])).exists)()


async def test_admin_ban_action_removes_and_logs(connect, users, rooms):
    bob = await connect(users["bob"])
    await bob.join("team")
    membership = await db(Membership.objects.get)(room__slug="team", user=users["bob"])
    http = await sync_to_async(admin_client)(users["root"])
    response = await sync_to_async(http.post)(
        "/admin/realtime/membership/",
        {"action": "ban", "_selected_action": [membership.pk]},
    )
    assert response.status_code == 302
    assert (await removed(bob))["reason"] == "banned"
    entry = await db(LogEntry.objects.get)(object_id=str(membership.pk))
    assert "Banned" in entry.get_change_message()


async def test_admin_announcement_is_delivered_as_a_server_message(connect, users, rooms):
    carol = await connect(users["carol"])
    await carol.join("news")
    http = await sync_to_async(admin_client)(users["root"])
    news = rooms["news"]
    form = await sync_to_async(http.post)(
        "/admin/realtime/room/", {"action": "announce", "_selected_action": [news.pk]}
    )
    assert form.status_code == 200 and b"Post an announcement" in form.content
    done = await sync_to_async(http.post)(
        "/admin/realtime/room/",
        {"action": "announce", "_selected_action": [news.pk], "apply": "1", "text": "Hear ye"},
    )
    assert done.status_code == 302
    (message,) = await carol.messages(1)
    assert (message["sender"], message["payload"]) == (None, {"text": "Hear ye"})
    assert await db(LogEntry.objects.filter(object_id=str(news.pk)).exists)()


async def test_admin_room_list_shows_online_counts_and_live_page(connect, users, rooms):
    alice, bob = await connect(users["alice"]), await connect(users["bob"])
    await alice.join("lobby")
    await bob.join("lobby")
    http = await sync_to_async(admin_client)(users["root"])
    page = (await sync_to_async(http.get)("/admin/realtime/room/")).content.decode()
    assert '<td class="field-online">2</td>' in page
    live = await sync_to_async(http.get)("/admin/realtime/room/live/")
    assert live.status_code == 200 and b"Live totals per process" in live.content


def test_retract_of_nothing_is_a_no_op(rooms):
    assert services.retract([12345]) == []


async def test_deleting_a_room_removes_everyone_without_a_retract_per_message(
    connect, users, rooms
):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    for i in range(3):
        await alice.request(type="send", room="lobby", ref=f"s{i}", payload={"text": str(i)})
        await alice.messages(1)
    await db(Room.objects.filter(slug="lobby").delete)()
    frame = await alice.recv()
    assert frame == {"type": "removed", "room": "lobby", "reason": "forbidden"}


async def test_announcing_to_an_archived_room_reports_instead_of_failing(users, rooms):
    def archive_and_announce():
        Room.objects.filter(slug="news").update(archived=True)
        http = admin_client(users["root"])
        return http.post(
            "/admin/realtime/room/",
            {
                "action": "announce",
                "_selected_action": [rooms["news"].pk, rooms["lobby"].pk],
                "apply": "1",
                "text": "hello",
            },
            follow=True,
        )

    response = await sync_to_async(archive_and_announce)()
    assert response.status_code == 200
    page = response.content.decode()
    assert "News: not posted: room is archived" in page  # the admin capitalises messages
    assert "posted to 1 room" in page
    assert await db(Message.objects.filter(room__slug="lobby").count)() == 1


async def test_a_retract_during_a_join_is_not_lost(connect, users, rooms, monkeypatch):
    alice = await connect(users["alice"])
    await alice.join("lobby")
    ack = await alice.request(type="send", room="lobby", ref="s", payload={"text": "x"})
    await alice.messages(1)
    bob = await connect(users["bob"])
    real_join = services.join_many

    def join_then_retract(requests):
        result = real_join(requests)
        moderation.retract([ack["id"]])  # lands while bob's join is being answered
        return result

    monkeypatch.setattr(services, "join_many", join_then_retract)
    await bob.request(type="join", room="lobby", ref="j", after_seq=0)
    frames = [await bob.recv() for _ in range(2)]  # presence_state, the replayed message
    assert [f["type"] for f in frames] == ["presence_state", "message"]
    assert await bob.recv() == {"type": "retract", "room": "lobby", "seq": ack["seq"]}
