"""Settings for realtime: every ``REALTIME_*`` name, its default and a one-line description.

Values are read from ``django.conf.settings`` on first access and kept; Django's
``setting_changed`` signal (sent by ``override_settings`` and pytest-django's ``settings``)
empties the cache, so overrides in tests still take effect at once.
docs/settings.md is tested against ``SETTINGS`` so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "REALTIME_MAX_PAYLOAD_BYTES",
        64 * 1024,
        "Largest message payload in UTF-8 JSON bytes; larger frames are refused unparsed.",
    ),
    Setting(
        "REALTIME_RECOVERY_LIMIT",
        1000,
        "Most messages replayed on a join with after_seq; a larger gap answers recovered=false.",
    ),
    Setting(
        "REALTIME_ALLOW_ANONYMOUS_READ",
        False,
        "Let anonymous connections join (read) public and announce rooms.",
    ),
    Setting(
        "REALTIME_HEARTBEAT",
        25,
        "Seconds between client pings, announced in the hello frame.",
    ),
    Setting(
        "REALTIME_CHANNEL_LAYER",
        "default",
        "Alias in CHANNEL_LAYERS that carries broadcasts between processes.",
    ),
    Setting(
        "REALTIME_GROUP_REFRESH",
        60,
        "Seconds between re-joins of each process to its rooms' groups (beats group expiry).",
    ),
    Setting(
        "REALTIME_PRESENCE_TTL",
        20,
        "Seconds a connection stays in presence without a heartbeat (a crashed process's users).",
    ),
    Setting(
        "REALTIME_METRICS_TOKEN",
        "",
        "Bearer token that may read /realtime/metrics besides staff users; empty: staff only.",
    ),
    Setting(
        "REALTIME_TYPING_RATE",
        "5/10s",
        "Typing frames one user may send, across rooms and processes (a rate string).",
    ),
    Setting(
        "REALTIME_GAP_FILL_BATCH",
        500,
        "Messages read from the database per query when a session fills a sequence gap.",
    ),
    Setting(
        "REALTIME_API_KEY",
        "",
        "Server key for POST /realtime/api/publish (Authorization: Bearer); empty disables it.",
    ),
    Setting(
        "REALTIME_SSE_KEEPALIVE",
        15,
        "Seconds of silence after which an SSE stream gets a keep-alive comment.",
    ),
    Setting(
        "REALTIME_LONGPOLL_TIMEOUT",
        25,
        "Longest a long-poll request waits for frames before answering with none.",
    ),
    Setting(
        "REALTIME_ALLOWED_ORIGINS",
        None,
        "WebSocket Origins allowed (scheme://host[:port]); None: ALLOWED_HOSTS, same scheme+port.",
    ),
    Setting(
        "REALTIME_TICKET_TTL",
        30,
        "Seconds a ticket from POST /realtime/api/tickets stays valid (it is single-use).",
    ),
    Setting(
        "REALTIME_AUTH_RECHECK",
        60,
        "Seconds between re-checks of each connection's login and room rights (0: never).",
    ),
    Setting(
        "REALTIME_FRAME_RATE",
        "200/10s",
        "Client frames one connection may send; beyond: rate_limited errors, then close 4029.",
    ),
    Setting(
        "REALTIME_SEND_RATE",
        "100/10s",
        "Messages one user may send, across connections and processes (a rate string).",
    ),
    Setting(
        "REALTIME_MAX_CONNECTIONS_PER_USER",
        20,
        "Open WebSocket connections per user in one process; the next is closed with 4029.",
    ),
    Setting(
        "REALTIME_MAX_CONNECTIONS_PER_IP",
        200,
        "Open WebSocket connections per client address in one process; the next gets 4029.",
    ),
    Setting(
        "REALTIME_SEND_BATCH_WAIT",
        0.005,
        "Seconds a busy send writer waits for more sends before storing the next batch.",
    ),
    Setting(
        "REALTIME_MAX_BUFFERED_BYTES",
        1024 * 1024,
        "Bytes written but not yet taken by a client before it is closed as slow (4008).",
    ),
    Setting(
        "REALTIME_PRESENCE_DIFF_INTERVAL",
        0.1,
        "Least seconds between one room's presence diffs from one process; changes merge.",
    ),
    Setting(
        "REALTIME_GC_FREEZE",
        True,
        "gc.freeze() the heap once the ASGI app is built: shorter full-collection pauses.",
    ),
)

_DEFAULTS = {s.name: s.default for s in SETTINGS}


class _Conf:
    """Attribute access to REALTIME_* settings with their defaults."""

    REALTIME_MAX_PAYLOAD_BYTES: int
    REALTIME_RECOVERY_LIMIT: int
    REALTIME_ALLOW_ANONYMOUS_READ: bool
    REALTIME_HEARTBEAT: int
    REALTIME_CHANNEL_LAYER: str
    REALTIME_GROUP_REFRESH: float
    REALTIME_GAP_FILL_BATCH: int
    REALTIME_PRESENCE_TTL: float
    REALTIME_METRICS_TOKEN: str
    REALTIME_TYPING_RATE: str
    REALTIME_API_KEY: str
    REALTIME_ALLOWED_ORIGINS: list[str] | tuple[str, ...] | None
    REALTIME_TICKET_TTL: float
    REALTIME_AUTH_RECHECK: float
    REALTIME_FRAME_RATE: str
    REALTIME_SEND_RATE: str
    REALTIME_MAX_CONNECTIONS_PER_USER: int
    REALTIME_MAX_CONNECTIONS_PER_IP: int
    REALTIME_MAX_BUFFERED_BYTES: int
    REALTIME_SEND_BATCH_WAIT: float
    REALTIME_SSE_KEEPALIVE: float
    REALTIME_LONGPOLL_TIMEOUT: float
    REALTIME_GC_FREEZE: bool
    REALTIME_PRESENCE_DIFF_INTERVAL: float

    def __getattr__(self, name: str) -> Any:
        # Only called for names not cached in the instance yet (see _forget).
        if name not in _DEFAULTS:
            raise AttributeError(name)
        value = getattr(django_settings, name, _DEFAULTS[name])
        self.__dict__[name] = value
        return value


conf = _Conf()


def _forget(**kwargs: Any) -> None:
    # Any setting may change: CHANNEL_LAYERS or DEBUG do not live here, but cheap to clear.
    conf.__dict__.clear()


setting_changed.connect(_forget, dispatch_uid="realtime.conf")
