"""publish() / apublish() and manage.py realtime_publish.

Unit tests use the in-memory layer with WebsocketCommunicator sessions; the sync calls run
through sync_to_async, as a sync view under daphne does, so the broadcast reaches this loop's
hub. The last tests use a private redis-server: publish() from plain threads (no event loop
anywhere near them) and from a manage.py subprocess, delivered across the real channel layer,
with Redis' own client counters showing that connections are reused, not leaked.
"""

import asyncio
import json
import math
import os
import subprocess
import threading
import time

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import close_old_connections, connection, transaction

from realtime import broker, publishing, services
from realtime.errors import Forbidden, RoomNotFound, Unavailable
from realtime.layers import channel_layer
from realtime.models import Message, Room
from realtime.publishing import InvalidMessage, apublish, publish
from tests import servers
from tests.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10


class Socket(Client):
    """The shared test client, plus a check that nothing but presence is waiting."""

    async def assert_silent(self):
        """Nothing but presence frames is waiting (checked after a later, delivered marker)."""
        while not await self.comm.receive_nothing(timeout=0.1):
            frame = await self.recv(skip=())
            assert frame["type"].startswith("presence"), frame


@pytest.fixture
async def socket(hub, users, rooms):
    """alice, connected and joined to lobby."""
    sock = Socket(users["alice"])
    await sock.open()
    await sock.join("lobby")
    yield sock
    await sock.close()


@pytest.fixture
def broadcasts(monkeypatch):
    """Record publishing's broadcasts instead of sending them."""
    sent = []
    monkeypatch.setattr(publishing, "broadcast", sent.append)
    return sent


def stored():
    return list(Message.objects.order_by("seq").values_list("seq", "payload", "sender"))


# -- sync publish() ----------------------------------------------------------------------


def test_publish_outside_a_transaction_stores_and_returns_the_message(rooms):
    message = publish("lobby", {"text": "hi"})
    assert message["room"] == "lobby"
    assert (message["seq"], message["sender"], message["payload"]) == (1, None, {"text": "hi"})
    assert message["id"] == Message.objects.get().pk
    assert message["sent_at"].endswith("Z")
    assert stored() == [(1, {"text": "hi"}, None)]


def test_published_message_is_in_history_like_a_client_send(users, rooms):
    services.append_message("lobby", users["bob"], {"text": "from bob"})
    publish("lobby", {"text": "from the server"})
    page = services.history("lobby", users["alice"], None, 10)
    assert [(m["seq"], m["sender"]) for m in page] == [
        (1, {"id": users["bob"].pk, "name": "bob"}),
        (2, None),
    ]


async def test_publish_from_sync_code_reaches_joined_sockets(socket):
    message = await sync_to_async(publish)("lobby", {"text": "hello"})
    [frame] = await socket.messages(1)
    assert frame == {"type": "message", **message}
    assert frame["sender"] is None


def test_publish_inside_a_transaction_broadcasts_on_commit(rooms, broadcasts):
    with transaction.atomic():
        message = publish("lobby", {"text": "later"})
        assert broadcasts == []
        assert Message.objects.filter(seq=1).exists()  # stored in the caller's transaction
    assert broadcasts == [message]


def test_rollback_stores_and_sends_nothing(rooms, broadcasts):
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        publish("lobby", {"text": "never"})
        1 / 0  # noqa: B018
    assert broadcasts == []
    assert stored() == []
    # The seq was given back: the next message is 1, without a hole.
    assert publish("lobby", {"text": "next"})["seq"] == 1


def test_rolled_back_savepoint_drops_only_its_own_message(rooms, broadcasts):
    with transaction.atomic():
        first = publish("lobby", {"text": "kept"})
        try:
            with transaction.atomic():
                publish("lobby", {"text": "dropped"})
                raise RuntimeError
        except RuntimeError:
            pass
    assert broadcasts == [first]
    assert stored() == [(1, {"text": "kept"}, None)]


async def test_transaction_commit_delivers_and_rollback_delivers_nothing(socket):
    def work():
        with transaction.atomic():
            publish("lobby", {"text": "committed"})
        try:
            with transaction.atomic():
                publish("lobby", {"text": "rolled back"})
                raise RuntimeError
        except RuntimeError:
            pass
        publish("lobby", {"text": "marker"})

    await sync_to_async(work)()
    frames = await socket.messages(2)
    assert [(f["seq"], f["payload"]["text"]) for f in frames] == [(1, "committed"), (2, "marker")]
    await socket.assert_silent()


async def test_apublish_stores_and_delivers(socket):
    message = await apublish("lobby", {"text": "async"})
    assert message["seq"] == 1
    [frame] = await socket.messages(1)
    assert frame["payload"] == {"text": "async"}


async def test_publish_refuses_to_run_on_an_event_loop(rooms):
    with pytest.raises(RuntimeError, match="apublish"):
        publish("lobby", {"text": "x"})


@pytest.mark.parametrize(
    ("room", "payload", "code"),
    [
        ("Lobby", {"text": "x"}, "invalid_room"),
        ("", {"text": "x"}, "invalid_room"),
        (None, {"text": "x"}, "invalid_room"),
        ("lobby", ["not", "an", "object"], "bad_frame"),
        ("lobby", "text", "bad_frame"),
        ("lobby", {"n": math.nan}, "bad_frame"),
        ("lobby", {"when": object()}, "bad_frame"),
        ("lobby", {(1, 2): "tuple key"}, "bad_frame"),
        ("lobby", {"nul": "a\x00b"}, "bad_frame"),
        ("lobby", {"lone": "\ud800"}, "bad_frame"),
        ("lobby", {"big": "x" * 70_000}, "too_large"),
    ],
)
def test_bad_room_or_payload_is_refused_before_anything_is_stored(rooms, room, payload, code):
    with pytest.raises(InvalidMessage) as caught:
        publish(room, payload)
    assert caught.value.code == code
    assert isinstance(caught.value, ValueError)
    assert stored() == []


def test_payload_is_stored_as_json_gives_it_back(rooms):
    message = publish("lobby", {"items": (1, 2), 3: "three"})
    assert message["payload"] == {"items": [1, 2], "3": "three"}
    assert Message.objects.get().payload == {"items": [1, 2], "3": "three"}


def test_unknown_room_raises_room_not_found(rooms):
    with pytest.raises(RoomNotFound):
        publish("nowhere", {"text": "x"})


def test_archived_room_takes_no_messages(rooms):
    Room.objects.filter(slug="lobby").update(archived=True)
    with pytest.raises(Forbidden):
        publish("lobby", {"text": "x"})
    assert stored() == []


def test_broadcast_failure_outside_a_transaction_is_unavailable_but_stored(rooms, monkeypatch):
    async def down(*args):
        raise ConnectionError("layer down")

    monkeypatch.setattr(broker, "publish_message", down)
    with pytest.raises(Unavailable):
        publish("lobby", {"text": "x"})
    assert stored() == [(1, {"text": "x"}, None)]


def test_broadcast_failure_after_commit_does_not_fail_the_commit(rooms, monkeypatch, caplog):
    async def down(*args):
        raise ConnectionError("layer down")

    monkeypatch.setattr(broker, "publish_message", down)
    with transaction.atomic():
        publish("lobby", {"text": "x"})
    assert stored() == [(1, {"text": "x"}, None)]
    assert "broadcast of lobby#1 failed" in caplog.text


async def test_sync_code_called_from_the_server_loop_broadcasts_on_that_loop():
    # A sync view under daphne runs like this: through sync_to_async from the server's loop.
    running = asyncio.get_running_loop()
    assert await sync_to_async(publishing._server_loop)() is running
    plain = []
    thread = threading.Thread(target=lambda: plain.append(publishing._server_loop()))
    thread.start()
    thread.join(TIMEOUT)
    assert plain == [None]


def test_run_sync_runs_a_coroutine_function_from_a_plain_thread():
    async def add(a, b=0):
        await asyncio.sleep(0)
        return a + b

    results = []
    thread = threading.Thread(target=lambda: results.append(publishing.run_sync(add, 2, b=3)))
    thread.start()
    thread.join(TIMEOUT)
    assert results == [5]


def test_run_sync_gives_up_after_its_deadline(monkeypatch):
    monkeypatch.setattr(publishing, "BROADCAST_TIMEOUT", 0.1)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        publishing.run_sync(asyncio.sleep, 30)
    assert time.monotonic() - started < 10
    assert publishing.run_sync(asyncio.sleep, 0, "still usable") == "still usable"


# -- manage.py realtime_publish ----------------------------------------------------------


async def test_command_publishes_text_and_json(socket, capsys):
    await sync_to_async(call_command)("realtime_publish", "lobby", "--text", "hello")
    await sync_to_async(call_command)("realtime_publish", "lobby", "--json", '{"n": [1, 2]}')
    frames = await socket.messages(2)
    assert [f["payload"] for f in frames] == [{"text": "hello"}, {"n": [1, 2]}]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [m["seq"] for m in printed] == [1, 2]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["lobby", "--json", "{not json"], "--json is not valid JSON"),
        (["lobby", "--json", '{"n": NaN}'], "--json is not valid JSON"),
        (["lobby", "--json", "[1, 2]"], "--json must be a JSON object"),
        (["lobby", "--json", '"text"'], "--json must be a JSON object"),
        (["nowhere", "--text", "x"], "room 'nowhere' does not exist (room_not_found)"),
        (["Not A Slug", "--text", "x"], "(invalid_room)"),
        (["lobby", "--text", "a\x00b"], "(bad_frame)"),
    ],
)
def test_command_errors_are_clear(rooms, args, error):
    with pytest.raises(CommandError) as caught:
        call_command("realtime_publish", *args)
    assert error in str(caught.value)
    assert stored() == []


def test_command_requires_exactly_one_payload_option(rooms):
    with pytest.raises(CommandError, match="one of the arguments --json --text is required"):
        call_command("realtime_publish", "lobby")
    with pytest.raises(CommandError, match="not allowed with"):
        call_command("realtime_publish", "lobby", "--text", "a", "--json", "{}")


# -- real Redis: plain threads and a manage.py process -------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with servers.running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def redis_layer(redis_server, settings):
    """CHANNEL_LAYERS on the private Redis, with this loop's hub on it."""
    settings.CHANNEL_LAYERS = {"default": channel_layer(redis_server.url)}
    layer = get_channel_layer()
    await layer.flush()
    hub = broker.get_hub()
    yield layer
    await hub.close()
    # The publisher loop closes its own pool (in its thread); then this loop's.
    await asyncio.to_thread(publishing._publisher.close)
    await layer.flush()  # closes this loop's connections


def redis_clients(server):
    """(connected clients, connections ever accepted), not counting this query's own."""
    with redis.Redis(host=servers.LOOPBACK, port=server.port) as client:
        info = client.info()
    return info["connected_clients"] - 1, info["total_connections_received"]


@pytest.mark.integration
async def test_publish_from_plain_threads_reuses_one_pool(redis_layer, redis_server, users, rooms):
    sock = Socket(users["alice"])
    await sock.open()
    await sock.join("lobby")
    threads_n, per_thread = 4, 25
    errors = []
    start = threading.Barrier(threads_n)

    def worker(index):
        try:
            start.wait(TIMEOUT)
            for i in range(per_thread):
                publish("lobby", {"thread": index, "i": i})
        except Exception as exc:
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    without_publisher, _ = redis_clients(redis_server)
    await asyncio.to_thread(publish, "lobby", {"warm": "up"})
    assert [f["seq"] for f in await sock.messages(1)] == [1]
    before_clients, before_total = redis_clients(redis_server)
    for round_ in range(2):
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
        for thread in workers:
            thread.start()
        for thread in workers:
            await asyncio.to_thread(thread.join, 120)
        assert not any(t.is_alive() for t in workers)
        assert errors == []
        frames = await sock.messages(threads_n * per_thread)
        first = 2 + round_ * threads_n * per_thread
        assert [f["seq"] for f in frames] == list(range(first, first + len(frames)))
        assert all(f["sender"] is None for f in frames)

    clients, total = redis_clients(redis_server)
    # 200 publishes from 8 threads: at most one connection per concurrent publish, kept in
    # the publisher loop's pool (+2 for this loop's hub); a loop per call would open 200+.
    assert total - before_total <= threads_n + 2
    assert clients - before_clients <= threads_n + 2
    # Closing the publisher loop closes its connections; the next publish starts anew.
    await asyncio.to_thread(publishing._publisher.close)
    await asyncio.to_thread(
        servers.wait_until,
        lambda: redis_clients(redis_server)[0] <= without_publisher,
        "publisher connections closed",
        TIMEOUT,
    )
    await asyncio.to_thread(publish, "lobby", {"after": "close"})
    [frame] = await sock.messages(1)
    assert frame["payload"] == {"after": "close"}
    await sock.close()


COMMAND = [str(servers.VENV_BIN / "python"), "manage.py", "realtime_publish", "lobby"]


@pytest.mark.integration
async def test_command_process_publishes_across_processes_and_exits_cleanly(
    redis_layer, redis_server, tmp_path
):
    env = servers.django_env(tmp_path / "db.sqlite3", redis_server.url)
    await asyncio.to_thread(servers.prepare_database, env)
    env["PYTHONWARNINGS"] = "always::ResourceWarning"
    channel = await redis_layer.new_channel()
    await redis_layer.group_add(broker.room_group("lobby"), channel)
    for n in (1, 2, 3):
        done = await asyncio.to_thread(
            subprocess.run,
            [*COMMAND, "--text", f"from a process {n}"],
            cwd=servers.REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=servers.COMMAND_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        for bad in ("Traceback", "Event loop is closed", "Unclosed", "ResourceWarning"):
            assert bad not in done.stderr, done.stderr
        assert json.loads(done.stdout)["seq"] == n
        received = await asyncio.wait_for(redis_layer.receive(channel), TIMEOUT)
        assert received["type"] == broker.MESSAGE
        assert (received["room"], received["seq"]) == ("lobby", n)
        assert json.loads(received["frame"])["payload"] == {"text": f"from a process {n}"}


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_publisher_loop_is_replaced_after_fork(rooms):
    publish("lobby", {"text": "parent"})
    loop = publishing._publisher._current()
    pid = os.fork()
    if pid == 0:  # the child: a new loop (the parent's thread does not exist here)
        code = 0 if publishing._publisher._current() is not loop else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert publishing._publisher._current() is loop
