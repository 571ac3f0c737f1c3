"""Who may open a connection: the Origin allow-list, signed single-use tickets, connection caps.

ASGI middleware for the WebSocket routes (``realtime.routing`` stacks them):

- ``OriginCheck`` refuses (HTTP 403) a handshake whose ``Origin`` does not match the allow-list
  by scheme, host and port: ``REALTIME_ALLOWED_ORIGINS``, or by default the request's own
  scheme and port with a host in ``ALLOWED_HOSTS``. Cross-site WebSocket hijacking needs a
  foreign origin, so a forged page gets 403 even with the visitor's session cookie.
- ``TicketAuth`` takes a ticket from ``Sec-WebSocket-Protocol`` (``realtime.ticket.<ticket>``)
  for clients that cannot send the session cookie; a bad ticket is refused with 403.
- ``ConnectionCaps`` counts this process's open connections per user and per client address;
  the one over ``REALTIME_MAX_CONNECTIONS_PER_USER`` / ``_PER_IP`` is accepted and closed
  with 4029 (so the client can tell it apart from a refusal and back off).

Tickets are signed (``django.core.signing``, so forged or expired ones fail without a lookup)
and single-use: issuing stores a record under the ticket's nonce in Redis (or this process's
memory without a Redis layer) and redeeming takes it with GETDEL, atomically, on any process.
Ticket values never reach a log: ``install_log_redaction`` masks them in daphne's access log
and in every logging handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.core import signing
from django.http.request import split_domain_port, validate_host
from django.utils.crypto import constant_time_compare

from realtime import store
from realtime.conf import conf
from realtime.protocol import CloseCode

logger = logging.getLogger(__name__)

SUBPROTOCOL = "realtime.v1"
TICKET_PROTOCOL_PREFIX = "realtime.ticket."
TICKET_QUERY_PARAM = "ticket"
_SALT = "realtime.ticket"
_KEY_PREFIX = "realtime:ticket:"
# A ticket is at most this long; anything longer is refused before any signature work.
MAX_TICKET_LENGTH = 512
_DEFAULT_PORTS = {"http": 80, "https": 443}


# -- Origin ----------------------------------------------------------------------------------


def parse_origin(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin value such as ``https://example.com:8443``, or None."""
    try:
        parts = urlsplit(text.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None:
        return None
    return scheme, host.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin1")
    return None


def request_scheme(scope: dict[str, Any]) -> str:
    """The page scheme a same-site client would have: https behind TLS, else http."""
    if scope.get("scheme") in ("wss", "https"):
        return "https"
    # daphne does not put the forwarded scheme into WebSocket scopes; a TLS-terminating proxy
    # (deploy/nginx) sends it. A page cannot set this header on a WebSocket handshake.
    forwarded = (_header(scope, b"x-forwarded-proto") or "").split(",")[0].strip().lower()
    return "https" if forwarded in ("https", "wss") else "http"


def origin_allowed(scope: dict[str, Any], origin: str | None) -> bool:
    """True when the handshake's ``origin`` matches the allow-list by scheme, host and port."""
    if origin is None:
        return False
    parsed = parse_origin(origin)
    if parsed is None:
        return False
    configured = conf.REALTIME_ALLOWED_ORIGINS
    if configured is not None:
        if "*" in configured:
            return True
        return parsed in {p for entry in configured if (p := parse_origin(entry)) is not None}
    scheme, host, port = parsed
    if scheme != request_scheme(scope):
        return False
    allowed_hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed_hosts:
        # Django's own fallback for requests (HttpRequest.get_host) while developing.
        allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]
    if not validate_host(host, allowed_hosts):
        return False
    _, host_port = split_domain_port(_header(scope, b"host") or "")
    expected = int(host_port) if host_port.isdigit() else _DEFAULT_PORTS[scheme]
    return port == expected


async def deny(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Refuse a WebSocket handshake: the server answers HTTP 403."""
    # Not channels' WebsocketDenier: as a consumer it would open a channel-layer channel (a
    # Redis round trip) for every refused attempt.
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


class OriginCheck:
    """ASGI middleware: refuse WebSocket handshakes from origins off the allow-list (403)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    @property
    def allowed_origins(self) -> list[str]:
        """The configured allow-list; by default [] (``["*"]`` when ALLOWED_HOSTS has "*")."""
        configured = conf.REALTIME_ALLOWED_ORIGINS
        if configured is None:
            return ["*"] if "*" in settings.ALLOWED_HOSTS else []
        return list(configured)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.application(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if not origin_allowed(scope, origin):
            logger.warning("realtime: refused a WebSocket from origin %.100r", origin)
            await deny(scope, receive, send)
            return
        await self.application(scope, receive, send)


# -- tickets ---------------------------------------------------------------------------------


class TicketError(Exception):
    """A ticket that cannot be redeemed; ``reason`` never contains the ticket."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    """What a connection's authentication rests on, re-validated while it lives."""

    user_id: str
    session_key: str | None
    auth_hash: str


def _signer() -> signing.TimestampSigner:
    # "." keeps the ticket a valid Sec-WebSocket-Protocol token (":" is not one).
    return signing.TimestampSigner(salt=_SALT, sep=".")


class _MemoryTickets:
    """Single-use records within this process (the in-memory layer's single process)."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def put(self, nonce: str, record: str, ttl: float) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._records) > 10_000:
                for key in [k for k, (exp, _) in self._records.items() if exp < now]:
                    del self._records[key]
            self._records[nonce] = (now + ttl, record)

    def take(self, nonce: str) -> str | None:
        with self._lock:
            found = self._records.pop(nonce, None)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]


_memory_tickets = _MemoryTickets()


def issue_ticket(user: Any, session_key: str | None) -> str:
    """A signed, single-use ticket for ``user``, valid for REALTIME_TICKET_TTL seconds."""
    if user is None or not user.is_authenticated:
        raise ValueError("tickets are only issued to logged-in users")
    nonce = secrets.token_urlsafe(18)
    ttl = float(conf.REALTIME_TICKET_TTL)
    record = json.dumps(
        {"u": str(user.pk), "s": session_key, "h": user.get_session_auth_hash()},
        separators=(",", ":"),
    )
    client = store.sync_client()
    if client is None:
        _memory_tickets.put(nonce, record, ttl)
    else:
        try:
            client.set(_KEY_PREFIX + nonce, record, px=int(ttl * 1000) + 1000)
        finally:
            client.close()
    return _signer().sign_object({"u": str(user.pk), "n": nonce})


def _unsign(ticket: str) -> dict[str, str]:
    if not isinstance(ticket, str) or not 0 < len(ticket) <= MAX_TICKET_LENGTH:
        raise TicketError("malformed")
    try:
        payload = _signer().unsign_object(ticket, max_age=float(conf.REALTIME_TICKET_TTL))
    except signing.SignatureExpired:
        raise TicketError("expired") from None
    except (signing.BadSignature, ValueError):
        raise TicketError("bad signature") from None
    if not isinstance(payload, dict) or not all(
        isinstance(payload.get(k), str) for k in ("u", "n")
    ):
        raise TicketError("malformed")
    return payload


def _check_record(payload: dict[str, str], raw: Any) -> tuple[Any, Credentials]:
    """The ticket's user and credentials, from its stored record; TicketError otherwise."""
    if raw is None:
        raise TicketError("already used or unknown")
    record = json.loads(raw)
    if record.get("u") != payload["u"]:
        raise TicketError("not this user's ticket")
    credentials = Credentials(payload["u"], record.get("s"), str(record.get("h", "")))
    user = _current_user(credentials)
    if user is None:
        raise TicketError("the user's session has ended")
    return user, credentials


def _current_user(credentials: Credentials) -> Any:
    """The user if ``credentials`` still hold (active, same password, session alive); else None."""
    user = get_user_model()._default_manager.filter(pk=credentials.user_id).first()
    if user is None or not getattr(user, "is_active", True):
        return None
    current = user.get_session_auth_hash()
    if credentials.session_key:
        from importlib import import_module

        engine = import_module(settings.SESSION_ENGINE)
        data = engine.SessionStore(credentials.session_key).load()
        # Django's own rule (django.contrib.auth.get_user): logout and flush delete the
        # session; a password change makes the stored hash stale.
        if str(data.get(SESSION_KEY)) != credentials.user_id:
            return None
        if not constant_time_compare(str(data.get(HASH_SESSION_KEY, "")), current):
            return None
    elif not constant_time_compare(credentials.auth_hash, current):
        return None
    return user


def redeem_ticket(ticket: str) -> tuple[Any, Credentials]:
    """Take a ticket (sync; SSE and long-poll views): its user and credentials, or TicketError.

    The ticket is consumed even when the user check fails afterwards: it is single-use.
    """
    payload = _unsign(ticket)
    client = store.sync_client()
    if client is None:
        raw = _memory_tickets.take(payload["n"])
    else:
        try:
            raw = client.getdel(_KEY_PREFIX + payload["n"])
        finally:
            client.close()
    return _check_record(payload, raw)


async def aredeem_ticket(ticket: str) -> tuple[Any, Credentials]:
    """Take a ticket (async): its user and credentials, or TicketError."""
    payload = _unsign(ticket)
    client = store.async_client()
    if client is None:
        raw = _memory_tickets.take(payload["n"])
    else:
        raw = await client.getdel(_KEY_PREFIX + payload["n"])
    return await sync_to_async(_check_record, thread_sensitive=True)(payload, raw)


def ticket_from_scope(scope: dict[str, Any]) -> str | None:
    """The ticket offered in ``Sec-WebSocket-Protocol`` or (HTTP transports) ``?ticket=``."""
    for protocol in scope.get("subprotocols") or ():
        if protocol.startswith(TICKET_PROTOCOL_PREFIX):
            return str(protocol[len(TICKET_PROTOCOL_PREFIX) :])
    query = scope.get("query_string", b"")
    if scope["type"] != "websocket" and query:
        values = parse_qs(bytes(query).decode("latin1")).get(TICKET_QUERY_PARAM)
        if values:
            return values[0]
    return None


def ticket_from_request(request: Any) -> str | None:
    """The ``ticket`` query parameter of an HTTP request (SSE, long-poll), if any."""
    value = request.GET.get(TICKET_QUERY_PARAM)
    return value if isinstance(value, str) and value else None


def authenticate_request(request: Any) -> tuple[Any, Credentials | None]:
    """For HTTP transports: the user of ``?ticket=`` (redeemed) or of the session.

    Raises TicketError for a bad ticket, or one for another user than the session's.
    """
    ticket = ticket_from_request(request)
    session_user = getattr(request, "user", None)
    if ticket is None:
        session = getattr(request, "session", None)
        return session_user, credentials_for(session_user, session)
    user, credentials = redeem_ticket(ticket)
    _same_user(session_user, user)
    return user, credentials


def _same_user(session_user: Any, ticket_user: Any) -> None:
    signed_in = session_user is not None and session_user.is_authenticated
    if signed_in and str(session_user.pk) != str(ticket_user.pk):
        raise TicketError("the ticket belongs to another user than the session")


def credentials_for(user: Any, session: Any) -> Credentials | None:
    """Credentials of a session-authenticated ``user`` (None when anonymous)."""
    if user is None or not user.is_authenticated:
        return None
    session_key = getattr(session, "session_key", None)
    return Credentials(str(user.pk), session_key, user.get_session_auth_hash())


def credentials_from_scope(scope: dict[str, Any]) -> Credentials | None:
    """Credentials of the connection's user (ticket or session), None when anonymous."""
    found = scope.get("realtime_credentials")
    if isinstance(found, Credentials):
        return found
    return credentials_for(scope.get("user"), scope.get("session"))


def still_valid(credentials: Credentials) -> Any:
    """The user, freshly read, if ``credentials`` still hold; None once revoked (sync)."""
    return _current_user(credentials)


class TicketAuth:
    """ASGI middleware: a ticket in ``Sec-WebSocket-Protocol`` authenticates the connection.

    Put it inside channels' AuthMiddlewareStack: a ticket for another user than the session
    cookie's is refused. Without a ticket the session's user stands.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.inner(scope, receive, send)
            return
        ticket = ticket_from_scope(scope)
        if ticket is None:
            await self.inner(scope, receive, send)
            return
        try:
            user, credentials = await aredeem_ticket(ticket)
            _same_user(scope.get("user"), user)
        except TicketError as exc:
            logger.warning("realtime: refused a WebSocket ticket: %s", exc.reason)
            await deny(scope, receive, send)
            return
        # Nothing downstream sees the ticket (it is never echoed as the chosen subprotocol).
        offered = [
            p for p in scope.get("subprotocols") or () if not p.startswith(TICKET_PROTOCOL_PREFIX)
        ]
        scope = dict(scope, user=user, realtime_credentials=credentials, subprotocols=offered)
        await self.inner(scope, receive, send)


# -- connection caps -------------------------------------------------------------------------


def client_address(scope: dict[str, Any]) -> str:
    """The client's address (daphne --proxy-headers puts the forwarded one here)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class ConnectionCaps:
    """ASGI middleware: at most N open connections per user and per address, in this process."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.per_user: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()

    def _over(self, user_key: str | None, ip: str) -> str | None:
        if (
            user_key is not None
            and self.per_user[user_key] >= conf.REALTIME_MAX_CONNECTIONS_PER_USER
        ):
            return "user"
        if self.per_ip[ip] >= conf.REALTIME_MAX_CONNECTIONS_PER_IP:
            return "address"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.inner(scope, receive, send)
            return
        user = scope.get("user")
        user_key = str(user.pk) if user is not None and user.is_authenticated else None
        ip = client_address(scope)
        over = self._over(user_key, ip)
        if over is not None:
            logger.warning("realtime: connection cap per %s reached; closing with 4029", over)
            await _refuse_with(receive, send, CloseCode.RATE_LIMITED)
            return
        if user_key is not None:
            self.per_user[user_key] += 1
        self.per_ip[ip] += 1
        try:
            await self.inner(scope, receive, send)
        finally:
            if user_key is not None:
                self.per_user[user_key] -= 1
                if self.per_user[user_key] <= 0:
                    del self.per_user[user_key]
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]


async def _refuse_with(receive: Any, send: Any, code: int) -> None:
    # Accept, then close with ``code``: unlike a 403 the client learns why (and backs off).
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": int(code)})
    # Bounded: the server ends the instance once the close handshake is done or times out.
    async with asyncio.timeout(30):
        while (await receive())["type"] != "websocket.disconnect":
            pass


# -- keeping tickets out of logs -------------------------------------------------------------

_TICKET_RE = re.compile(
    r"((?:[?&;]|\b)" + TICKET_QUERY_PARAM + r"=|" + re.escape(TICKET_PROTOCOL_PREFIX) + r")"
    r"[^&\s\"',;]+"
)


def redact(text: str) -> str:
    """``text`` with every ticket value replaced by ``[redacted]``."""
    if TICKET_QUERY_PARAM not in text and TICKET_PROTOCOL_PREFIX not in text:
        return text  # the common case, without running the expression
    return _TICKET_RE.sub(r"\1[redacted]", text)


class TicketRedactingFilter(logging.Filter):
    """A logging filter that masks tickets in the formatted message (add it to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_installed_filter = TicketRedactingFilter()


def _redact_access_log() -> None:
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:  # pragma: no cover - another server
        return
    original = AccessLogGenerator.write_entry
    if getattr(original, "realtime_redacts", False):
        return

    def write_entry(self: Any, host: Any, date: Any, request: Any, *args: Any, **kw: Any) -> Any:
        return original(self, host, date, redact(str(request)), *args, **kw)

    write_entry.realtime_redacts = True  # type: ignore[attr-defined]
    AccessLogGenerator.write_entry = write_entry


def install_log_redaction() -> None:
    """Mask tickets in daphne's access log and in every configured logging handler."""
    _redact_access_log()
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for found in loggers:
        for handler in found.handlers:
            if _installed_filter not in handler.filters:
                handler.addFilter(_installed_filter)
