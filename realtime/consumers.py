"""The WebSocket transport: a thin adapter between an ASGI socket and session.Session."""

from __future__ import annotations

from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer

from realtime.session import Session

# No alias of that name exists, so channels gives the consumer no channel of its own: all
# broadcasts reach sessions through the per-process hub (broker.py), never per connection.
_NO_LAYER = "realtime.no-per-connection-channel"


class RealtimeConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """Speaks protocol v1 over one WebSocket."""

    channel_layer_alias = _NO_LAYER
    session: Session | None = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        # channels >= 4.2 hops to a thread (aclose_old_connections) before every handler;
        # our database calls already run through database_sync_to_async, which does that.
        await getattr(self, get_handler_name(message))(message)

    async def connect(self) -> None:
        await self.accept()
        self.session = Session(self.scope.get("user"), self._emit, self._close)
        await self.session.start()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        assert self.session is not None
        if text_data is None:
            await self.session.receive_binary()
        else:
            await self.session.receive_text(text_data)

    async def disconnect(self, code: int) -> None:
        if self.session is not None:
            await self.session.close()

    async def _emit(self, text: str) -> None:
        await self.send(text_data=text)

    async def _close(self, code: int) -> None:
        await self.close(code=code)
