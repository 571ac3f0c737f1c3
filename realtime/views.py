"""HTTP JSON API (docs/http-api.md): the WebSocket's shapes over plain requests.

Every view goes through ``api()``, which checks the method, enforces CSRF where a session
authenticates a write, and translates every error to a JSON body
``{"error": {"code", "message"}}`` with its status code, in ``error_response()`` only.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from realtime import auth, publishing, ratelimit, services
from realtime import presence as presence_state
from realtime.conf import conf
from realtime.errors import RateLimited, RealtimeError, Unauthorized, Unavailable
from realtime.models import Room
from realtime.protocol import (
    HISTORY_DEFAULT_LIMIT,
    HISTORY_MAX_LIMIT,
    ClientType,
    ErrorCode,
    FrameError,
    encode,
    is_valid_room,
    parse,
)

logger = logging.getLogger(__name__)

View = Callable[..., HttpResponse]

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNKNOWN_TYPE: 404,
    ErrorCode.INVALID_ROOM: 400,
    ErrorCode.ROOM_NOT_FOUND: 404,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_JOINED: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}

_MAX_SEQ = 2**63 - 1


class ApiError(RealtimeError):
    """An HTTP-only refusal: a status of its own and extra response headers."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.headers = headers or {}


def error_response(exc: RealtimeError | FrameError) -> JsonResponse:
    """The JSON error response of ``exc``; the one place errors become status codes."""
    code = ErrorCode(exc.code)
    status = getattr(exc, "status", None) or STATUS[code]
    error: dict[str, Any] = {"code": str(code), "message": exc.message}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        error["retry_after"] = retry_after
    response = JsonResponse({"error": error}, status=status)
    for name, value in getattr(exc, "headers", {}).items():
        response[name] = value
    if retry_after is not None:
        response["Retry-After"] = str(max(1, round(retry_after)))
    return response


class _CsrfCheck(CsrfViewMiddleware):
    """Django's own CSRF check, refusing with this API's JSON body instead of an HTML page."""

    def _reject(self, request: HttpRequest, reason: str) -> HttpResponse:
        logger.warning("realtime: CSRF check failed for %s: %s", request.path, reason)
        return error_response(ApiError(ErrorCode.FORBIDDEN, f"CSRF check failed: {reason}"))


def _csrf_failure(request: HttpRequest) -> HttpResponse | None:
    check = _CsrfCheck(lambda _: HttpResponse())
    check.process_request(request)
    return check.process_view(request, None, (), {})  # type: ignore[arg-type]


def api(*methods: str, csrf: bool = False) -> Callable[[View], View]:
    """Make ``view`` an API view: allowed ``methods`` (any when none), JSON errors, CSRF when
    ``csrf``.

    The views are exempt from CsrfViewMiddleware (its refusal is an HTML page) and, when
    ``csrf`` is set, run the same check themselves. They never run in ATOMIC_REQUESTS'
    transaction: a broadcast must happen (or fail, 503) before the response is written.
    """

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                if methods and request.method not in methods:
                    raise ApiError(
                        ErrorCode.BAD_FRAME,
                        f"method {request.method} is not allowed here; use {', '.join(methods)}",
                        status=405,
                        headers={"Allow": ", ".join(methods)},
                    )
                if csrf and (failure := _csrf_failure(request)) is not None:
                    return failure
                return view(request, *args, **kwargs)
            except (RealtimeError, FrameError) as exc:
                return error_response(exc)
            except RequestDataTooBig:
                return error_response(
                    ApiError(ErrorCode.TOO_LARGE, "the request body is too large")
                )
            except DatabaseError:
                logger.warning("realtime: database error in %s", request.path, exc_info=True)
                return error_response(Unavailable())
            except Exception:
                logger.exception("realtime: unexpected error in %s", request.path)
                return error_response(ApiError(ErrorCode.INTERNAL, "internal error"))

        return transaction.non_atomic_requests(csrf_exempt(wrapper))

    return decorate


def _room_slug(room: str) -> str:
    if not is_valid_room(room):
        raise FrameError(ErrorCode.INVALID_ROOM, "room must match ^[a-z0-9][a-z0-9_-]{0,63}$")
    return room


def _int_param(
    request: HttpRequest, name: str, minimum: int, maximum: int = _MAX_SEQ
) -> int | None:
    raw = request.GET.get(name)
    if raw is None:
        return None
    if re.fullmatch(r"[0-9]{1,19}", raw) is None or not minimum <= int(raw) <= maximum:
        raise FrameError(
            ErrorCode.BAD_FRAME, f"{name} must be an integer from {minimum} to {maximum}"
        )
    return int(raw)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise FrameError(ErrorCode.BAD_FRAME, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "the request body must be a JSON object")
    return body


def _history(
    slug: str, user: Any, after_seq: int | None, before_seq: int | None, limit: int
) -> list[dict[str, Any]]:
    return services.history(slug, user, before_seq, limit, after_seq=after_seq)


async def _online(room: str) -> list[dict[str, Any]]:
    # The backend is per event loop (Redis clients are bound to one): fetch it on the loop.
    return await presence_state.get_backend().users(room)


def room_users(room: str) -> list[dict[str, Any]]:
    """Who is online in ``room``: [{id, name, connections}], one entry per user."""
    return publishing.run_sync(_online, room)


@api("GET")
def rooms(request: HttpRequest) -> HttpResponse:
    """The rooms the requesting user may join, with their head seq."""
    visible = [
        {
            "room": room.slug,
            "title": room.title or room.slug,
            "kind": room.kind,
            "seq": room.head_seq,
            "epoch": room.epoch,
        }
        for room in Room.objects.filter(archived=False)
        if services.can_read(room, request.user)
    ]
    return JsonResponse({"rooms": visible})


@api("GET", "POST", csrf=True)
def messages(request: HttpRequest, room: str) -> HttpResponse:
    """GET: a page of the room's history. POST: send a message as the logged-in user."""
    slug = _room_slug(room)
    if request.method == "POST":
        return _send(request, slug)
    after_seq = _int_param(request, "after_seq", 0)
    before_seq = _int_param(request, "before_seq", 1)
    limit = _int_param(request, "limit", 1, HISTORY_MAX_LIMIT) or HISTORY_DEFAULT_LIMIT
    page = _history(slug, request.user, after_seq, before_seq, limit)
    return JsonResponse({"room": slug, "messages": page})


def _send(request: HttpRequest, slug: str) -> HttpResponse:
    if not request.user.is_authenticated:
        raise Unauthorized()
    body = _json_body(request)
    if "payload" not in body:
        raise FrameError(ErrorCode.BAD_FRAME, "payload is required")
    # The same validation as a WebSocket send, by construction.
    fields = {k: body[k] for k in ("payload", "client_msg_id") if k in body}
    frame = parse(
        encode({"type": ClientType.SEND, "room": slug, **fields}),
        conf.REALTIME_MAX_PAYLOAD_BYTES,
    )
    assert frame.payload is not None
    _spend_send_budget(request.user.pk)
    result = services.append_message(slug, request.user, frame.payload, frame.client_msg_id)
    try:
        # A retry broadcasts again, as on the WebSocket: the first attempt may not have.
        publishing.broadcast(result.message)
    except Unavailable as exc:
        raise Unavailable(
            "the message is stored but could not be broadcast; retry with the same client_msg_id"
        ) from exc
    return JsonResponse(result.message, status=201 if result.created else 200)


async def _send_budget(user_pk: Any) -> float | None:
    rate = ratelimit.parse_rate(conf.REALTIME_SEND_RATE)
    return await ratelimit.get_limiter().hit(f"send:{user_pk}", rate)


def _spend_send_budget(user_pk: Any) -> None:
    """REALTIME_SEND_RATE, shared with the WebSocket's sends (one budget per user)."""
    try:
        retry_after = publishing.run_sync(_send_budget, user_pk)
    except RealtimeError:
        raise
    except Exception as exc:
        raise Unavailable() from exc
    if retry_after is not None:
        raise RateLimited(
            f"at most {conf.REALTIME_SEND_RATE} messages",
            retry_after=math.ceil(retry_after * 1000) / 1000,
        )


@api("GET")
def presence(request: HttpRequest, room: str) -> HttpResponse:
    """Who is online in the room (read rights)."""
    slug = _room_slug(room)
    services.authorize(services.get_room(slug), request.user, send=False)
    return JsonResponse({"room": slug, "users": room_users(slug)})


def _bearer_token(request: HttpRequest) -> str | None:
    scheme, _, token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@api("POST")
def publish(request: HttpRequest) -> HttpResponse:
    """Publish a server message (sender null) with the server key; no session, no CSRF."""
    key = conf.REALTIME_API_KEY
    if not isinstance(key, str) or not key:
        raise ApiError(
            ErrorCode.FORBIDDEN, "the publish API is disabled: REALTIME_API_KEY is not set"
        )
    token = _bearer_token(request)
    if token is None or not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(
            ErrorCode.UNAUTHORIZED,
            "send the server key as `Authorization: Bearer <REALTIME_API_KEY>`",
            headers={"WWW-Authenticate": 'Bearer realm="realtime"'},
        )
    body = _json_body(request)
    room = body.get("room")
    if not isinstance(room, str):
        raise FrameError(ErrorCode.INVALID_ROOM, "room is required and must be a string")
    if "payload" not in body:
        raise FrameError(ErrorCode.BAD_FRAME, "payload is required")
    return JsonResponse(publishing.publish(room, body["payload"]), status=201)


@api("POST", csrf=True)
def tickets(request: HttpRequest) -> HttpResponse:
    """A signed, single-use ticket for the logged-in user (WebSocket subprotocol, ?ticket=)."""
    if not request.user.is_authenticated:
        raise Unauthorized()
    ticket = auth.issue_ticket(request.user, request.session.session_key)
    body = {
        "ticket": ticket,
        "expires_in": conf.REALTIME_TICKET_TTL,
        "subprotocols": [auth.SUBPROTOCOL, auth.TICKET_PROTOCOL_PREFIX + ticket],
    }
    response = JsonResponse(body, status=201)
    response["Cache-Control"] = "no-store"
    return response


@api()
def not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other path under api/: a JSON 404 instead of Django's HTML page."""
    raise ApiError(ErrorCode.UNKNOWN_TYPE, f"no API endpoint at {request.path}", status=404)
