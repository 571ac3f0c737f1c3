"""System checks; every ID is listed in docs/checks.md (a test keeps the two in step)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from realtime.conf import SETTINGS, conf
from realtime.layers import BRPOP_TIMEOUT
from realtime.ratelimit import parse_rate

# (setting, type, minimum)
_NUMERIC: dict[str, tuple[type | tuple[type, ...], int]] = {
    "REALTIME_MAX_PAYLOAD_BYTES": (int, 256),
    "REALTIME_RECOVERY_LIMIT": (int, 0),
    "REALTIME_HEARTBEAT": (int, 1),
    "REALTIME_GROUP_REFRESH": ((int, float), 1),
    "REALTIME_GAP_FILL_BATCH": (int, 1),
    "REALTIME_PRESENCE_TTL": ((int, float), 1),
}

CHECK_IDS = (
    "realtime.E001",
    "realtime.E002",
    "realtime.E003",
    "realtime.W001",
    "realtime.W002",
    "realtime.W003",
)


@register(Tags.compatibility)
def check_installed_apps(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """channels must be installed for the WebSocket routes and the channel layer."""
    if "channels" in settings.INSTALLED_APPS:
        return []
    return [
        Error(
            "'channels' is not in INSTALLED_APPS.",
            hint="Add 'channels' (and 'daphne', first, to serve with runserver) to INSTALLED_APPS.",
            id="realtime.E001",
        )
    ]


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


def _is_rate(value: object) -> bool:
    try:
        parse_rate(value)
    except (TypeError, ValueError):
        return False
    return True


def _describe(host: object) -> str:
    if isinstance(host, dict):
        return str(host.get("address", "(dict)"))
    return "(url string)" if isinstance(host, str) else repr(type(host))


@register(Tags.compatibility)
def check_settings(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """Every REALTIME_* setting has the right type and range."""
    errors: list[CheckMessage] = []
    for setting in SETTINGS:
        value = getattr(conf, setting.name)
        if setting.name in _NUMERIC:
            kind, minimum = _NUMERIC[setting.name]
            ok = isinstance(value, kind) and not isinstance(value, bool) and value >= minimum
            expected = f"a number >= {minimum}"
        elif isinstance(setting.default, bool):
            ok, expected = isinstance(value, bool), "True or False"
        elif setting.name.endswith("_RATE"):
            ok, expected = _is_rate(value), "a rate string such as '20/10s'"
        else:
            ok, expected = isinstance(value, type(setting.default)), type(setting.default).__name__
        if not ok:
            errors.append(
                Error(
                    f"{setting.name} = {value!r} is invalid: expected {expected}.",
                    hint=setting.doc,
                    id="realtime.E003",
                )
            )
    return errors


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
