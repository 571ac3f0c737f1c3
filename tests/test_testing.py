"""realtime.testing: the helpers host projects use in their own tests.

These tests use the helpers the way a host project would: no fixtures of this repository
beyond users and rooms (no hub fixture), over the consumer alone and over the whole ASGI stack.
"""

import json
import re
from pathlib import Path

import pytest
from channels.generic.websocket import AsyncWebsocketConsumer
from django.test import TransactionTestCase

from realtime.models import Room
from realtime.testing import RealtimeClient, assert_delivered, connect, default_origin, publish

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def application():
    from project.asgi import application

    return application


async def test_connect_as_user_join_send_and_assert_delivery(users, rooms):
    async with connect(users["alice"]) as alice, connect(users["bob"]) as bob:
        assert alice.hello["user"] == {"id": users["alice"].pk, "name": "alice"}
        assert (await alice.join("lobby"))["seq"] == 0
        await bob.join("lobby")
        ack = await alice.send("lobby", {"text": "hi"})
        frames = await assert_delivered(ack, alice, bob)
        assert [f["payload"] for f in frames] == [{"text": "hi"}] * 2
        assert frames[1]["sender"]["name"] == "alice"


async def test_publish_reaches_every_member_without_a_sender(users, rooms):
    async with connect(users["alice"]) as alice, connect(users["bob"]) as bob:
        await alice.join("lobby")
        await bob.join("lobby")
        message = await publish("lobby", {"text": "from the server"})
        assert message["sender"] is None and message["seq"] == 1
        for frame in await assert_delivered(message, alice, bob):
            assert frame["payload"] == {"text": "from the server"} and frame["sender"] is None


async def test_join_with_after_seq_leaves_the_replay_for_expect_message(users, rooms):
    for n in range(3):
        await publish("lobby", {"n": n})
    async with connect(users["alice"]) as alice:
        ack = await alice.join("lobby", after_seq=1, epoch=1)
        assert ack["recovered"] is True
        assert (await alice.expect_message("lobby"))["payload"] == {"n": 1}
        assert (await alice.expect_message("lobby", seq=3))["payload"] == {"n": 2}
        assert await alice.drain() == []


async def test_expect_keeps_the_frames_it_skips(users, rooms):
    async with connect(users["alice"]) as alice:
        await alice.join("lobby")
        await alice.join("news")
        first = await publish("lobby", {"n": 1})
        second = await publish("news", {"n": 2})
        await alice.expect_message("news", seq=second["seq"])
        (left,) = await alice.drain()
        assert left["type"] == "message" and left["id"] == first["id"]


async def test_drain_is_empty_when_nothing_else_arrived(users, rooms):
    async with connect(users["alice"]) as alice:
        await alice.join("lobby")
        assert await alice.drain() == []


async def test_expect_fails_at_its_deadline_with_the_frames_seen(users, rooms):
    async with connect(users["alice"]) as alice:
        await alice.join("lobby")
        with pytest.raises(AssertionError, match="no message frame with room='lobby'") as failed:
            await alice.expect_message("lobby", within=0.3)
        assert "presence_state" in str(failed.value)


async def test_expect_fails_at_once_on_an_unexpected_error_frame(users, rooms):
    async with connect(users["alice"]) as alice:
        await alice.send_frame({"type": "nonsense"})
        with pytest.raises(AssertionError, match="unknown_type"):
            await alice.expect("pong")  # the default deadline is 10 s; this fails at once


async def test_join_refused_is_an_assertion_naming_the_error(users, rooms):
    async with connect(users["carol"]) as carol:
        with pytest.raises(AssertionError, match="forbidden"):
            await carol.join("team")
        assert (await carol.ping())["type"] == "pong"  # still usable


async def test_anonymous_user_by_default(rooms):
    async with connect() as anon:
        assert anon.hello["user"] is None
        reply = await anon.request({"type": "join", "room": "lobby"})
        assert reply["code"] == "unauthorized"


# -- the whole ASGI stack ------------------------------------------------------------------


async def test_through_the_project_asgi_application_with_a_session_cookie(
    application, users, rooms
):
    async with (
        connect(users["alice"], application=application) as alice,
        connect(users["bob"], application=application) as bob,
    ):
        assert alice.hello["user"]["name"] == "alice"
        await alice.join("team")
        await bob.join("team")
        ack = await bob.send("team", {"text": "members only"})
        await assert_delivered(ack, alice, bob)


async def test_through_the_project_asgi_application_anonymously(application, rooms):
    async with connect(application=application) as anon:
        assert anon.hello["user"] is None


async def test_a_foreign_origin_is_refused_by_the_project_asgi_application(application, users):
    with pytest.raises(AssertionError, match="refused"):
        async with connect(users["alice"], application=application, origin="http://evil.example"):
            pass


def test_default_origin_is_an_allowed_host(settings):
    settings.ALLOWED_HOSTS = ["*", ".example.com"]
    assert default_origin() == "http://example.com"
    settings.ALLOWED_HOSTS = []
    assert default_origin() == "http://localhost"


class Closer(AsyncWebsocketConsumer):
    """Says hello, then closes with 4003 on any frame."""

    async def connect(self):
        await self.accept()
        await self.send(text_data=json.dumps({"type": "hello", "user": None}))

    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=json.dumps({"type": "removed", "reason": "kicked"}))
        await self.close(code=4003)


async def test_expect_closed_returns_the_code_and_keeps_earlier_frames():
    async with connect(application=Closer.as_asgi()) as client:
        await client.send_frame({"type": "ping"})
        assert await client.expect_closed(4003) == 4003
        assert (await client.expect("removed"))["reason"] == "kicked"
        with pytest.raises(AssertionError, match=r"closed \(4003\)"):
            await client.expect("pong")


# -- unittest style ------------------------------------------------------------------------


class HostProjectStyleTests(TransactionTestCase):
    """The same helpers from Django's TransactionTestCase with an async test method."""

    async def test_publish_and_assert_delivery(self):
        from django.contrib.auth import get_user_model

        user = await get_user_model().objects.acreate(username="dora")
        await Room.objects.acreate(slug="hall")
        async with connect(user) as dora:
            self.assertIsInstance(dora, RealtimeClient)
            await dora.join("hall")
            (frame,) = await assert_delivered(await publish("hall", {"x": 1}), dora)
            self.assertEqual(frame["payload"], {"x": 1})


# -- docs/testing.md -----------------------------------------------------------------------


def documented_example():
    """The first python block of docs/testing.md, compiled: its test function."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    (code, *_) = re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)
    namespace = {}
    exec(compile(code, "docs/testing.md", "exec"), namespace)
    (name,) = [n for n in namespace if n.startswith("test_")]
    return namespace[name]


async def test_the_documented_example_passes(django_user_model):
    await documented_example()(django_user_model)
