"""The demo's ASGI application plus an echo WebSocket endpoint, for the attack tier only.

``/autobahn-echo/`` echoes every message unchanged; kosoku runs the Autobahn cases against it
(tests/test_autobahn.py). It exists only in the test servers: project/asgi.py has no such route.
"""

import os

from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application as django_asgi

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.attack_settings")
django_asgi_app = django_asgi()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from realtime.routing import websocket_application  # noqa: E402

ECHO_PATH = "/autobahn-echo/"


class Echo(AsyncWebsocketConsumer):
    """Sends every text or binary message back as it came."""

    channel_layer_alias = "realtime.no-per-connection-channel"

    async def receive(self, text_data=None, bytes_data=None):
        if text_data is not None:
            await self.send(text_data=text_data)
        else:
            await self.send(bytes_data=bytes_data)


_echo = Echo.as_asgi()
_realtime = websocket_application()


async def _websocket(scope, receive, send):
    if scope["path"] == ECHO_PATH:
        return await _echo(scope, receive, send)
    return await _realtime(scope, receive, send)


application = ProtocolTypeRouter(
    {"http": ASGIStaticFilesHandler(django_asgi_app), "websocket": _websocket}
)
