"""Graceful drain (realtime/drain.py) on the consumer, without a server process.

The daphne side (SIGTERM, the Twisted shutdown trigger, 1012 through nginx) is covered by
tests/test_faults.py against real processes.
"""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator

from realtime import drain
from realtime.protocol import CloseCode
from realtime.routing import websocket_application

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fresh_drain(monkeypatch, hub):
    monkeypatch.setattr(drain, "_draining", False)
    return drain


async def connected():
    communicator = WebsocketCommunicator(
        websocket_application(), "/ws/", headers=[(b"origin", b"http://127.0.0.1")]
    )
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "hello"
    return communicator


async def test_drain_all_closes_every_connection_with_1012(fresh_drain, settings):
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    clients = [await connected() for _ in range(3)]
    assert drain.live_count() == 3

    # The communicator answers the close frame the way a client does: it disconnects.
    async def answer(client):
        output = await client.receive_output(timeout=5)
        assert output == {"type": "websocket.close", "code": CloseCode.RESTARTING}
        await client.send_input({"type": "websocket.disconnect", "code": 1012})

    import asyncio

    still_open, *_ = await asyncio.gather(
        drain.drain_all(grace=5), *(answer(client) for client in clients)
    )
    assert still_open == 0 and drain.live_count() == 0 and drain.draining()
    for client in clients:
        await client.wait(timeout=5)


async def test_new_connection_while_draining_is_told_to_go(fresh_drain, settings):
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    drain.begin()
    communicator = WebsocketCommunicator(
        websocket_application(), "/ws/", headers=[(b"origin", b"http://127.0.0.1")]
    )
    connected, _ = await communicator.connect()
    assert connected
    assert await communicator.receive_output(timeout=5) == {
        "type": "websocket.close",
        "code": CloseCode.RESTARTING,
    }
    assert drain.live_count() == 0
    await communicator.disconnect()


async def test_drain_all_gives_up_at_the_deadline(fresh_drain, settings):
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    client = await connected()  # never answers the close
    assert await drain.drain_all(grace=0.2) == 1
    await client.disconnect()


def test_install_outside_daphne_does_nothing():
    # No running Twisted reactor in this process: nothing is hooked, nothing is imported.
    import asyncio
    import sys

    async def attempt():
        return drain.install()

    assert asyncio.run(attempt()) is False or "twisted.internet.reactor" in sys.modules
