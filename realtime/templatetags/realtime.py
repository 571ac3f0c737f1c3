"""Template tags: ``{% load realtime %}{% realtime_script room %}`` (docs/client.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django import template
from django.contrib.auth.models import AnonymousUser
from django.middleware.csrf import get_token
from django.templatetags.static import static
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, json_script
from django.utils.safestring import SafeString

from realtime import services
from realtime.models import Room

register = template.Library()

CONFIG_ID = "realtime-config"


def _rooms(rooms: Any) -> list[Room | str]:
    if rooms is None or rooms == "":
        return []
    if isinstance(rooms, (Room, str)):
        return [rooms]
    if isinstance(rooms, Iterable):
        return list(rooms)
    raise template.TemplateSyntaxError("realtime_script takes a Room, a slug or a list of them")


def _url(name: str, default: str) -> str:
    try:
        return reverse(name)
    except NoReverseMatch:  # realtime.urls included under a namespace-less include
        return default


def page_cursor(rooms: Any, user: Any) -> dict[str, dict[str, int]]:
    """{slug: {seq, epoch}} of the rooms ``user`` may read: where a page rendered now starts.

    A Room instance is used as loaded (its ``head_seq`` is the head the view read, so history
    the view rendered with ``before_seq = head_seq + 1`` joins up exactly); slugs are read.
    """
    given = _rooms(rooms)
    slugs = [r for r in given if isinstance(r, str)]
    loaded = {room.slug: room for room in Room.objects.filter(slug__in=slugs)} if slugs else {}
    cursor: dict[str, dict[str, int]] = {}
    for item in given:
        room = item if isinstance(item, Room) else loaded.get(item)
        if room is None or room.archived or not services.can_read(room, user):
            continue
        cursor[room.slug] = {"seq": room.head_seq, "epoch": room.epoch}
    return cursor


@register.simple_tag(takes_context=True)
def realtime_script(context: template.Context, rooms: Any = None) -> SafeString:
    """The browser client's script tag, after a JSON config the client reads on its own:
    endpoint URLs, the CSRF token, and each room's head seq and epoch as the page saw them."""
    request = context.get("request")
    user = getattr(request, "user", None) or AnonymousUser()
    config = {
        "urls": {
            "ws": "/ws/",
            "sse": _url("realtime:sse", "/realtime/sse/"),
            "poll": _url("realtime:poll", "/realtime/poll/"),
            "api": _url("realtime:rooms", "/realtime/api/rooms/"),
        },
        "csrfToken": get_token(request) if request is not None else None,
        "rooms": page_cursor(rooms, user) if rooms else {},
    }
    return format_html(
        '{}\n<script src="{}"></script>',
        json_script(config, CONFIG_ID),
        static("realtime/realtime.js"),
    )
