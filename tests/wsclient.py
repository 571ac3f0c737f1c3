"""A JSON-speaking WebsocketCommunicator for consumer-level tests."""

import json

from channels.testing import WebsocketCommunicator

from realtime.consumers import RealtimeConsumer

TIMEOUT = 5


class Client:
    """A WebsocketCommunicator speaking JSON frames."""

    def __init__(self, user):
        self.comm = WebsocketCommunicator(RealtimeConsumer.as_asgi(), "/ws/")
        self.comm.scope["user"] = user

    async def open(self):
        connected, _ = await self.comm.connect(timeout=TIMEOUT)
        assert connected
        hello = await self.recv()
        assert hello["type"] == "hello"
        return hello

    async def send(self, **frame):
        await self.comm.send_to(text_data=json.dumps(frame))

    async def recv(self, skip=("presence_diff",)):
        """The next frame, passing over presence diffs unless a test asks for them."""
        for _ in range(100):
            frame = json.loads(await self.comm.receive_from(timeout=TIMEOUT))
            if frame["type"] not in skip:
                return frame
        raise AssertionError("only skipped frames arrived")

    async def request(self, **frame):
        await self.send(**frame)
        return await self.recv()

    async def join(self, room, **extra):
        ack = await self.request(type="join", room=room, ref="j-" + room, **extra)
        assert ack["type"] == "ack", ack
        presence = await self.recv()
        assert presence["type"] == "presence_state"
        return ack

    async def messages(self, n):
        frames = [await self.recv() for _ in range(n)]
        assert all(f["type"] == "message" for f in frames), frames
        return frames

    async def assert_usable(self):
        assert await self.request(type="ping", ref="alive") == {"type": "pong", "ref": "alive"}

    async def close(self):
        await self.comm.disconnect()


def error(code, ref=None):
    def check(frame):
        assert frame["type"] == "error", frame
        assert frame["code"] == code, frame
        assert isinstance(frame["message"], str) and frame["message"]
        assert frame.get("ref") == ref

    return check
