"""Presence, typing, moderation and publish() across two real daphne processes.

A private redis-server and two daphne processes (A, B) share one database. Changes are made
from a third process (``manage.py shell``), as an admin, a signal handler or a Celery-style
worker would, and must reach live connections on both processes within 2 s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import RealtimeStack, login, manage, realtime_stack
from tests.test_integration import Client, connected

pytestmark = pytest.mark.integration

LIVE_WITHIN = 2.0  # the bound for moderation reaching every process
PRESENCE_HEALS_WITHIN = 30.0  # the bound after a process crash


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealtimeStack]:
    with realtime_stack(tmp_path_factory.mktemp("live"), daphnes=2) as running:
        yield running


@pytest.fixture(scope="module")
def cookies(stack: RealtimeStack) -> dict[str, str]:
    return {name: login(stack.servers[0], name) for name in ("alice", "bob", "carol")}


def shell(stack: RealtimeStack, code: str) -> str:
    """Run ``code`` in a separate Django process (manage.py shell)."""
    return manage(stack.env, "shell", "-c", code)


def user(frame_user: dict | None) -> str | None:
    return None if frame_user is None else frame_user["name"]


@contextlib.asynccontextmanager
async def pair(stack, cookies, room, left="alice", right="bob"):
    """``left`` on A and ``right`` on B, both joined to ``room``."""
    a, b = stack.servers
    async with (
        connected(a, cookies[left], f"{left}@A", user=left) as one,
        connected(b, cookies[right], f"{right}@B", user=right) as two,
    ):
        await one.join(room)
        await two.join(room)
        yield one, two


def diffs(client: Client, room: str) -> list[dict]:
    return [f for f in client.frames if f["type"] == "presence_diff" and f["room"] == room]


async def test_presence_is_shared_across_processes(stack, cookies):
    a, b = stack.servers
    async with connected(a, cookies["alice"], "alice@A", user="alice") as alice:
        await alice.join("lobby")
        async with (
            connected(b, cookies["bob"], "bob@B", user="bob") as bob,
            connected(b, cookies["bob"], "bob2@B", user="bob") as bob_tab,
        ):
            await bob.join("lobby")
            state = next(f for f in bob.frames if f["type"] == "presence_state")
            assert {(u["name"], u["connections"]) for u in state["users"]} == {
                ("alice", 1),
                ("bob", 1),
            }
            await alice.wait_for(
                lambda f: (
                    f["type"] == "presence_diff" and [u["name"] for u in f["joins"]] == ["bob"]
                ),
                what="bob joins",
            )
            await bob_tab.join("lobby")
            state = [f for f in bob_tab.frames if f["type"] == "presence_state"][-1]
            assert {(u["name"], u["connections"]) for u in state["users"]} == {
                ("alice", 1),
                ("bob", 2),
            }
        await alice.wait_for(
            lambda f: f["type"] == "presence_diff" and [u["name"] for u in f["leaves"]] == ["bob"],
            what="bob leaves",
        )
        # One leave for bob's two connections: only the last one counts.
        assert len([d for d in diffs(alice, "lobby") if d["leaves"]]) == 1


async def test_typing_crosses_processes_and_skips_the_typist(stack, cookies):
    async with pair(stack, cookies, "lobby") as (alice, bob):
        await bob.send_frame({"type": "typing", "room": "lobby"})
        (typing,) = await alice.wait_for(lambda f: f["type"] == "typing", what="typing")
        assert typing == {"type": "typing", "room": "lobby", "sender": typing["sender"]}
        assert user(typing["sender"]) == "bob"
        await bob.settle()
        assert not [f for f in bob.frames if f["type"] == "typing"]


async def test_publish_from_another_process_reaches_both(stack, cookies):
    async with pair(stack, cookies, "announcements") as (alice, bob):
        shell(
            stack,
            "from realtime.publishing import publish\n"
            "publish('announcements', {'text': 'from a worker'})",
        )
        for client in (alice, bob):
            (message,) = await client.wait_for(
                lambda f: f["type"] == "message", within=LIVE_WITHIN, what="published message"
            )
            assert message["sender"] is None and message["payload"] == {"text": "from a worker"}


async def test_ban_from_another_process_removes_within_two_seconds(stack, cookies):
    async with pair(stack, cookies, "lobby", left="alice", right="carol") as (alice, carol):
        started = time.monotonic()
        shell(
            stack,
            "from realtime.models import Membership, Room\n"
            "from django.contrib.auth.models import User\n"
            "Membership.objects.update_or_create(room=Room.objects.get(slug='lobby'),"
            " user=User.objects.get(username='carol'), defaults={'banned': True})",
        )
        (removed,) = await carol.wait_for(
            lambda f: f["type"] == "removed", within=LIVE_WITHIN, what="removed"
        )
        assert removed == {"type": "removed", "room": "lobby", "reason": "banned"}
        print(f"ban reached B {time.monotonic() - started:.2f} s after the shell started")
        await alice.settle()
        assert not [f for f in alice.frames if f["type"] == "removed"]
        shell(stack, "from realtime.models import Membership\nMembership.objects.all().delete()")


async def test_retract_and_archive_reach_both_processes(stack, cookies):
    shell(stack, "from realtime.models import Room\nRoom.objects.create(slug='doomed')")
    async with pair(stack, cookies, "doomed") as (alice, bob):
        ack = await alice.request({"type": "send", "room": "doomed", "payload": {"text": "regret"}})
        for client in (alice, bob):
            await client.wait_seq("doomed", ack["seq"])
        shell(stack, f"from realtime.moderation import retract\nretract([{ack['id']}])")
        for client in (alice, bob):
            (retract,) = await client.wait_for(
                lambda f: f["type"] == "retract", within=LIVE_WITHIN, what="retract"
            )
            assert retract == {"type": "retract", "room": "doomed", "seq": ack["seq"]}
        shell(
            stack,
            "from realtime.models import Room\n"
            "room = Room.objects.get(slug='doomed')\nroom.archived = True\nroom.save()",
        )
        for client in (alice, bob):
            (removed,) = await client.wait_for(
                lambda f: f["type"] == "removed", within=LIVE_WITHIN, what="removed"
            )
            assert removed["reason"] == "archived"


async def test_a_crashed_process_leaves_presence_within_30_seconds(
    tmp_path_factory: pytest.TempPathFactory,
):
    workdir: Path = tmp_path_factory.mktemp("crash")
    with realtime_stack(workdir, daphnes=2) as crash_stack:
        a, b = crash_stack.servers
        alice_cookie, bob_cookie = login(a, "alice"), login(b, "bob")
        async with connected(b, bob_cookie, "bob@B", user="bob") as bob:
            await bob.join("lobby")
            async with connected(a, alice_cookie, "alice@A", user="alice") as alice:
                await alice.join("lobby")
                await bob.wait_for(
                    lambda f: f["type"] == "presence_diff" and f["joins"], what="alice joins"
                )
                a.process.popen.kill()  # SIGKILL: no leave is ever sent
                a.process.popen.wait(10)
                killed = time.monotonic()
            await bob.wait_for(
                lambda f: (
                    f["type"] == "presence_diff" and [u["name"] for u in f["leaves"]] == ["alice"]
                ),
                within=PRESENCE_HEALS_WITHIN,
                what="alice leaves after the crash",
            )
            print(f"presence healed {time.monotonic() - killed:.1f} s after kill -9")
            state = await bob.request({"type": "leave", "room": "lobby"})
            assert state["type"] == "ack"
