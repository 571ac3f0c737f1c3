"""System checks; every ID is listed in docs/checks.md (a test keeps the two in step)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.utils.module_loading import import_string

from realtime.conf import SETTINGS, conf
from realtime.layers import BRPOP_TIMEOUT
from realtime.ratelimit import parse_rate

# (setting, type, minimum); docs/settings.md states each minimum (tests/test_docs.py).
_NUMERIC: dict[str, tuple[type | tuple[type, ...], int]] = {
    "REALTIME_MAX_PAYLOAD_BYTES": (int, 256),
    "REALTIME_RECOVERY_LIMIT": (int, 0),
    "REALTIME_HEARTBEAT": (int, 1),
    "REALTIME_GROUP_REFRESH": ((int, float), 1),
    "REALTIME_GAP_FILL_BATCH": (int, 1),
    "REALTIME_PRESENCE_TTL": ((int, float), 1),
    "REALTIME_TICKET_TTL": ((int, float), 1),
    "REALTIME_AUTH_RECHECK": ((int, float), 0),
    "REALTIME_MAX_CONNECTIONS_PER_USER": (int, 1),
    "REALTIME_MAX_CONNECTIONS_PER_IP": (int, 1),
    "REALTIME_MAX_BUFFERED_BYTES": (int, 65536),
    "REALTIME_SSE_KEEPALIVE": ((int, float), 1),
    "REALTIME_LONGPOLL_TIMEOUT": ((int, float), 1),
    "REALTIME_SEND_BATCH_WAIT": ((int, float), 0),
    "REALTIME_PRESENCE_DIFF_INTERVAL": ((int, float), 0),
}

CHECK_IDS = (
    "realtime.E001",
    "realtime.E002",
    "realtime.E003",
    "realtime.E004",
    "realtime.E005",
    "realtime.E006",
    "realtime.W001",
    "realtime.W002",
    "realtime.W003",
    "realtime.W004",
    "realtime.W005",
    "realtime.W006",
    "realtime.W007",
)

_ASGI_HINT = (
    "In asgi.py: application = realtime.routing.get_asgi_application(django_asgi_app); "
    "see docs/installation.md."
)


@register(Tags.compatibility)
def check_installed_apps(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """channels must be installed; daphne should come before staticfiles for runserver."""
    messages: list[CheckMessage] = []
    if not apps.is_installed("channels"):
        messages.append(
            Error(
                "'channels' is not in INSTALLED_APPS.",
                hint="Add 'channels' (and 'daphne', first, to serve with runserver) to "
                "INSTALLED_APPS.",
                id="realtime.E001",
            )
        )
    names = [config.name for config in apps.get_app_configs()]
    if "daphne" not in names:
        problem = "'daphne' is not in INSTALLED_APPS"
    elif "django.contrib.staticfiles" in names[: names.index("daphne")]:
        problem = "'daphne' comes after 'django.contrib.staticfiles' in INSTALLED_APPS"
    else:
        return messages
    messages.append(
        Warning(
            f"{problem}: runserver serves plain WSGI, without WebSockets.",
            hint="Put 'daphne' first in INSTALLED_APPS (its runserver serves ASGI).",
            id="realtime.W004",
        )
    )
    return messages


def _layer_config() -> dict[str, Any] | None:
    layers = getattr(settings, "CHANNEL_LAYERS", {}) or {}
    config = layers.get(conf.REALTIME_CHANNEL_LAYER)
    return config if isinstance(config, dict) else None


@register(Tags.compatibility)
def check_channel_layer(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """The layer must exist; warn about in-memory in production and Redis socket timeouts."""
    config = _layer_config()
    if config is None:
        return [
            Error(
                f"CHANNEL_LAYERS has no {conf.REALTIME_CHANNEL_LAYER!r} entry.",
                hint="Set CHANNEL_LAYERS = {'default': realtime.layers.channel_layer(REDIS_URL)}.",
                id="realtime.E002",
            )
        ]
    backend = str(config.get("BACKEND", ""))
    messages: list[CheckMessage] = []
    if backend.endswith("InMemoryChannelLayer") and not settings.DEBUG:
        messages.append(
            Warning(
                "The in-memory channel layer only reaches connections of one process.",
                hint="Use Redis in production: realtime.layers.channel_layer(REDIS_URL).",
                id="realtime.W001",
            )
        )
    # Only the core layer blocks in BRPOP; the pub/sub layer has no such trap.
    if backend.startswith("channels_redis.core"):
        for host in config.get("CONFIG", {}).get("hosts", []) or []:
            timeout = host.get("socket_timeout") if isinstance(host, dict) else None
            if timeout is None or timeout <= BRPOP_TIMEOUT:
                messages.append(
                    Warning(
                        f"Redis channel layer host {_describe(host)} has no socket_timeout above "
                        f"{BRPOP_TIMEOUT} s; idle processes lose their receive loop.",
                        hint="Give each host {'address': url, 'socket_timeout': 10}, or use "
                        "realtime.layers.channel_layer(REDIS_URL).",
                        id="realtime.W002",
                    )
                )
    return messages


def _describe(host: object) -> str:
    if isinstance(host, dict):
        return str(host.get("address", "(dict)"))
    return "(url string)" if isinstance(host, str) else repr(type(host))


def _valid(name: str, default: Any, value: Any) -> tuple[bool, str]:
    """(is ``value`` acceptable for setting ``name``, what is expected)."""
    if name in _NUMERIC:
        kind, minimum = _NUMERIC[name]
        ok = isinstance(value, kind) and not isinstance(value, bool) and value >= minimum
        return ok, f"a number >= {minimum}"
    if isinstance(default, bool):
        return isinstance(value, bool), "True or False"
    if name == "REALTIME_ALLOWED_ORIGINS":
        from realtime.auth import parse_origin

        ok = value is None or (
            isinstance(value, (list, tuple))
            and all(isinstance(v, str) and (v == "*" or parse_origin(v)) for v in value)
        )
        return ok, "None or a list of origins such as 'https://example.com' (or '*')"
    if name.endswith("_RATE"):
        try:
            parse_rate(value)
        except (TypeError, ValueError):
            return False, "a rate string such as '20/10s'"
        return True, "a rate string"
    if name.endswith(("_KEY", "_TOKEN")):
        # Sent in an Authorization header and compared exactly: whitespace (a stray newline
        # from a file) or non-ASCII characters would make every request fail.
        ok = isinstance(value, str) and (
            value == "" or (value.isascii() and value.isprintable() and " " not in value)
        )
        return ok, "a str of printable ASCII characters without spaces (or empty)"
    if default is None:  # optional: any value is the owning module's business
        return True, "any value"
    return isinstance(value, type(default)), type(default).__name__


@register(Tags.compatibility)
def check_settings(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """Every REALTIME_* setting has the right type and range, and its name is known."""
    messages: list[CheckMessage] = []
    for setting in SETTINGS:
        value = getattr(conf, setting.name)
        ok, expected = _valid(setting.name, setting.default, value)
        if not ok:
            messages.append(
                Error(
                    f"{setting.name} = {value!r} is invalid: expected {expected}.",
                    hint=setting.doc,
                    id="realtime.E003",
                )
            )
    known = [setting.name for setting in SETTINGS]
    for name in sorted(n for n in dir(settings) if n.startswith("REALTIME_")):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            messages.append(
                Warning(
                    f"{name} is not a realtime setting; realtime ignores it.",
                    hint=f"Did you mean {close[0]}?"
                    if close
                    else "The settings are listed in docs/settings.md.",
                    id="realtime.W007",
                )
            )
    return messages


@register(Tags.compatibility)
def check_sqlite(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """SQLite shared by several processes needs IMMEDIATE transactions to allocate seqs."""
    database = settings.DATABASES.get("default", {})
    if database.get("ENGINE") != "django.db.backends.sqlite3":
        return []
    if database.get("OPTIONS", {}).get("transaction_mode") == "IMMEDIATE":
        return []
    return [
        Warning(
            "SQLite without IMMEDIATE transactions: concurrent sends from several processes "
            "can fail with 'database is locked'.",
            hint='Set DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", '
            '"timeout": 20}, or use PostgreSQL for several processes.',
            id="realtime.W003",
        )
    ]


# -- the ASGI application ------------------------------------------------------------------

# Attributes under which ASGI middleware keeps the application it wraps: channels'
# BaseMiddleware and session/cookie middleware (inner), OriginValidator and Django's
# ASGIStaticFilesHandler (application), and the Starlette-style convention (app).
_WRAPPED = ("inner", "application", "app")
_MAX_NODES = 10_000


def _children(node: Any) -> list[Any]:
    from channels.routing import ProtocolTypeRouter, URLRouter

    if isinstance(node, ProtocolTypeRouter):
        # Only WebSocket routes matter here; HTTP is the project's own business.
        websocket = node.application_mapping.get("websocket")
        return [] if websocket is None else [websocket]
    if isinstance(node, URLRouter):
        return [route.callback for route in node.routes]
    return [child for attr in _WRAPPED if (child := getattr(node, attr, None)) is not None]


def _consumer_chains(root: Any) -> Iterator[tuple[Any, ...]]:
    """Each chain of routers and middleware from ``root`` down to a RealtimeConsumer route."""
    from realtime.consumers import RealtimeConsumer

    stack: list[tuple[Any, ...]] = [(root,)]
    visited = 0
    while stack and visited < _MAX_NODES:
        visited += 1
        chain = stack.pop()
        node = chain[-1]
        if any(node is outer for outer in chain[:-1]):
            continue  # a cycle; one shared route reached by two chains is checked twice
        consumer = getattr(node, "consumer_class", None)
        if isinstance(consumer, type) and issubclass(consumer, RealtimeConsumer):
            yield chain
            continue
        stack.extend((*chain, child) for child in reversed(_children(node)))


def _is_origin_check(node: Any) -> bool:
    from channels.security.websocket import OriginValidator

    from realtime.auth import OriginCheck

    return isinstance(node, (OriginValidator, OriginCheck))


def _is_auth(node: Any) -> bool:
    from channels.auth import AuthMiddleware

    return isinstance(node, AuthMiddleware) or type(node).__module__ == "realtime.auth"


@register(Tags.compatibility)
def check_asgi_application(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """ASGI_APPLICATION routes /ws/ to realtime behind an Origin check and authentication."""
    path = getattr(settings, "ASGI_APPLICATION", None)
    if not path:
        return [
            Error(
                "ASGI_APPLICATION is not set: realtime's WebSocket routes are served only "
                "through an ASGI application.",
                hint='Set ASGI_APPLICATION = "mysite.asgi.application". ' + _ASGI_HINT,
                id="realtime.E004",
            )
        ]
    try:
        application = import_string(path)
    except Exception as exc:
        return [
            Error(
                f"ASGI_APPLICATION {path!r} cannot be imported: {type(exc).__name__}: {exc}",
                hint="Fix the dotted path or the error in that module. " + _ASGI_HINT,
                id="realtime.E005",
            )
        ]
    chains = list(_consumer_chains(application))
    if not chains:
        return [
            Error(
                f"ASGI_APPLICATION {path!r} does not route WebSocket connections to "
                "realtime's consumer.",
                hint=_ASGI_HINT + " A custom wrapper must keep the application it wraps in "
                "an .inner, .application or .app attribute for this check to see through it.",
                id="realtime.E006",
            )
        ]
    messages: list[CheckMessage] = []
    validators = [n for chain in chains for n in chain if _is_origin_check(n)]
    if not all(any(_is_origin_check(n) for n in chain) for chain in chains):
        messages.append(
            Warning(
                f"ASGI_APPLICATION {path!r} routes WebSocket connections to realtime without "
                "an Origin check: any web page can open one with its visitors' session cookie.",
                hint="Wrap the routes in realtime.auth.OriginCheck (or channels' "
                "OriginValidator), as realtime.routing.get_asgi_application() does.",
                id="realtime.W005",
            )
        )
    elif any("*" in getattr(v, "allowed_origins", ()) for v in validators):
        messages.append(
            Warning(
                f"ASGI_APPLICATION {path!r} checks the WebSocket Origin against '*': any web "
                "page can open a connection with its visitors' session cookie.",
                hint="List your origins in REALTIME_ALLOWED_ORIGINS, or your hosts in "
                "ALLOWED_HOSTS, instead of '*' (see docs/security.md).",
                id="realtime.W005",
            )
        )
    if not all(any(_is_auth(n) for n in chain) for chain in chains):
        messages.append(
            Warning(
                f"ASGI_APPLICATION {path!r} routes WebSocket connections to realtime without "
                "authentication middleware: every connection is anonymous.",
                hint="Wrap the routes in channels' AuthMiddlewareStack, as "
                "realtime.routing.get_asgi_application() does.",
                id="realtime.W006",
            )
        )
    return messages
