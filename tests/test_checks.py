import pytest
from channels.auth import AuthMiddlewareStack
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator, OriginValidator
from django.core.checks import run_checks
from django.urls import path

from realtime.routing import get_asgi_application, websocket_urlpatterns


def ids(**kwargs):
    return {message.id for message in run_checks(**kwargs) if message.id.startswith("realtime.")}


def messages(check_id):
    return [m for m in run_checks() if m.id == check_id]


def test_demo_settings_pass_every_check(settings):
    settings.DEBUG = True  # pytest-django turns it off; the demo runs with it on
    assert ids() == set()


def test_every_message_has_a_hint(settings):
    settings.DEBUG = False
    settings.INSTALLED_APPS = [
        a for a in settings.INSTALLED_APPS if a not in {"channels", "daphne"}
    ]
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.REALTIME_HEARTBEAT = 0
    settings.REALTIME_HEARTBEET = 10
    settings.ASGI_APPLICATION = "tests.test_checks.NO_ORIGIN_NO_AUTH"
    found = [m for m in run_checks() if m.id.startswith("realtime.")]
    assert {m.id for m in found} >= {"realtime.E001", "realtime.E003", "realtime.W001"}
    assert all(m.hint for m in found), found


# -- INSTALLED_APPS ------------------------------------------------------------------------


def test_e001_channels_missing(settings):
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "channels"]
    assert "realtime.E001" in ids()


def test_w004_daphne_missing(settings):
    settings.DEBUG = True
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "daphne"]
    assert ids() == {"realtime.W004"}


def test_w004_daphne_after_staticfiles(settings):
    apps = [a for a in settings.INSTALLED_APPS if a != "daphne"]
    settings.INSTALLED_APPS = [*apps, "daphne"]
    (message,) = messages("realtime.W004")
    assert "after 'django.contrib.staticfiles'" in message.msg


# -- the channel layer ---------------------------------------------------------------------


def test_e002_layer_missing(settings):
    settings.CHANNEL_LAYERS = {}
    assert "realtime.E002" in ids()


def test_w001_in_memory_layer_without_debug(settings):
    settings.DEBUG = False
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    assert "realtime.W001" in ids()


@pytest.mark.parametrize(
    "host",
    ["redis://127.0.0.1:6379/0", {"address": "redis://127.0.0.1:6379/0"}, {"socket_timeout": 5}],
)
def test_w002_redis_host_without_socket_timeout(settings, host):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [host]}}
    }
    assert "realtime.W002" in ids()


def test_layer_helper_output_passes(settings):
    from realtime.layers import channel_layer

    settings.DEBUG = False
    settings.CHANNEL_LAYERS = {"default": channel_layer("redis://127.0.0.1:6379/0")}
    assert ids() == set()


def test_w002_not_raised_for_pubsub_layer(settings):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:6379/0"]},
        }
    }
    assert "realtime.W002" not in ids()


def test_w003_sqlite_without_immediate_transactions(settings, monkeypatch):
    monkeypatch.setitem(settings.DATABASES["default"], "OPTIONS", {})
    assert "realtime.W003" in ids()


# -- REALTIME_* settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REALTIME_MAX_PAYLOAD_BYTES", "64k"),
        ("REALTIME_MAX_PAYLOAD_BYTES", 10),
        ("REALTIME_RECOVERY_LIMIT", -1),
        ("REALTIME_HEARTBEAT", True),
        ("REALTIME_ALLOW_ANONYMOUS_READ", "yes"),
        ("REALTIME_CHANNEL_LAYER", 3),
        ("REALTIME_GAP_FILL_BATCH", 0),
        ("REALTIME_TYPING_RATE", "fast"),
        ("REALTIME_TYPING_RATE", 5),
        ("REALTIME_API_KEY", "secret-key\n"),
        ("REALTIME_API_KEY", "two words"),
        ("REALTIME_API_KEY", None),
        ("REALTIME_METRICS_TOKEN", "t\u00f6ken"),
        ("REALTIME_GROUP_REFRESH", 0.5),
        ("REALTIME_PRESENCE_TTL", "20"),
    ],
)
def test_e003_malformed_setting(settings, name, value):
    setattr(settings, name, value)
    (message,) = messages("realtime.E003")
    assert message.msg.startswith(f"{name} = {value!r} is invalid")


@pytest.mark.parametrize("value", ["", "k3y-With.Symbols_~+/=", "x" * 200])
def test_e003_accepts_header_safe_keys(settings, value):
    settings.REALTIME_API_KEY = value
    settings.REALTIME_METRICS_TOKEN = value
    assert "realtime.E003" not in ids()


def test_e003_accepts_a_float_where_documented(settings):
    settings.REALTIME_GROUP_REFRESH = 2.5
    assert "realtime.E003" not in ids()


def test_w007_unknown_setting_suggests_the_close_one(settings):
    settings.REALTIME_HEARTBEET = 10
    (message,) = messages("realtime.W007")
    assert "REALTIME_HEARTBEET" in message.msg
    assert message.hint == "Did you mean REALTIME_HEARTBEAT?"


# -- ASGI_APPLICATION ----------------------------------------------------------------------


async def http_app(scope, receive, send):
    raise NotImplementedError


class OtherConsumer(AsyncWebsocketConsumer):
    pass


class Wrapper:
    """Third-party style middleware keeping the wrapped app in ``.app``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def protected(routes):
    return AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(routes)))


FULL = get_asgi_application(http_app)
NESTED = Wrapper(
    ProtocolTypeRouter(
        {
            "http": http_app,
            "websocket": protected(
                [
                    path("chat/", OtherConsumer.as_asgi()),
                    path("live/", Wrapper(URLRouter(websocket_urlpatterns))),
                ]
            ),
        }
    )
)
HTTP_ONLY = ProtocolTypeRouter({"http": http_app})
OTHER_CONSUMER = ProtocolTypeRouter(
    {"http": http_app, "websocket": protected([path("ws/", OtherConsumer.as_asgi())])}
)
NO_ORIGIN = ProtocolTypeRouter(
    {"http": http_app, "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns))}
)
ANY_ORIGIN = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": OriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)), ["*"]),
    }
)
NO_AUTH = ProtocolTypeRouter(
    {"http": http_app, "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns))}
)
NO_ORIGIN_NO_AUTH = ProtocolTypeRouter(
    {"http": http_app, "websocket": URLRouter(websocket_urlpatterns)}
)
# One route protected, one not: the unprotected one is what an attacker uses.
HALF_PROTECTED = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": URLRouter(
            [
                path("a/", protected(websocket_urlpatterns)),
                path("b/", AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
            ]
        ),
    }
)


def asgi_ids(settings, name):
    settings.ASGI_APPLICATION = name if "." in name else f"tests.test_checks.{name}"
    return {
        i for i in ids() if i in {f"realtime.{x}" for x in ("E004", "E005", "E006", "W005", "W006")}
    }


@pytest.mark.parametrize("name", ["FULL", "NESTED", "project.asgi.application"])
def test_wrapped_routes_pass(settings, name):
    assert asgi_ids(settings, name) == set()


def test_e004_asgi_application_unset(settings):
    settings.DEBUG = True
    del settings.ASGI_APPLICATION
    assert ids() == {"realtime.E004"}


@pytest.mark.parametrize("name", ["tests.test_checks.MISSING", "no_such_module.application"])
def test_e005_asgi_application_not_importable(settings, name):
    settings.ASGI_APPLICATION = name
    (message,) = messages("realtime.E005")
    assert name in message.msg


@pytest.mark.parametrize(
    "name", ["HTTP_ONLY", "OTHER_CONSUMER", "django.core.handlers.asgi.ASGIHandler"]
)
def test_e006_realtime_routes_missing(settings, name):
    assert asgi_ids(settings, name) == {"realtime.E006"}


@pytest.mark.parametrize("name", ["NO_ORIGIN", "ANY_ORIGIN", "HALF_PROTECTED"])
def test_w005_origin_check_missing(settings, name):
    assert asgi_ids(settings, name) == {"realtime.W005"}


def test_w006_auth_missing(settings):
    assert asgi_ids(settings, "NO_AUTH") == {"realtime.W006"}


def test_w005_and_w006_together(settings):
    assert asgi_ids(settings, "NO_ORIGIN_NO_AUTH") == {"realtime.W005", "realtime.W006"}


def test_every_numeric_setting_has_a_declared_bound():
    from realtime import checks
    from realtime.conf import SETTINGS

    numeric = {
        s.name
        for s in SETTINGS
        if isinstance(s.default, int | float) and not isinstance(s.default, bool)
    }
    assert numeric == set(checks._NUMERIC)


def test_every_default_is_valid():
    from realtime import checks
    from realtime.conf import SETTINGS

    for s in SETTINGS:
        assert checks._valid(s.name, s.default, s.default)[0], s.name
