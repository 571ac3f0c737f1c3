"""{% realtime_script %}: the client's config, with each room's cursor as the page saw it."""

import json
import re

import pytest
from django.template import Context, Template
from django.test import RequestFactory

from realtime import services

pytestmark = pytest.mark.django_db


def render(user, rooms_expr="", **context):
    request = RequestFactory().get("/")
    request.user = user
    template = Template("{% load realtime %}{% realtime_script " + rooms_expr + " %}")
    return template.render(Context({"request": request, **context}))


def config(html):
    match = re.search(r'<script id="realtime-config" type="application/json">(.*?)</script>', html)
    assert match, html
    return json.loads(match.group(1))


def test_renders_the_config_then_the_script(users, rooms):
    html = render(users["alice"])
    assert html.endswith('<script src="/static/realtime/realtime.js"></script>')
    got = config(html)
    assert got["urls"] == {
        "ws": "/ws/",
        "sse": "/realtime/sse/",
        "poll": "/realtime/poll/",
        "api": "/realtime/api/rooms/",
    }
    assert isinstance(got["csrfToken"], str) and len(got["csrfToken"]) == 64
    assert got["rooms"] == {}


def test_embeds_head_and_epoch_of_the_readable_rooms_only(users, rooms):
    for n in range(3):
        services.append_message("lobby", users["alice"], {"n": n})
    services.append_message("team", users["alice"], {"n": 0})
    slugs = ["lobby", "team", "nowhere"]
    assert config(render(users["alice"], "slugs", slugs=slugs))["rooms"] == {
        "lobby": {"seq": 3, "epoch": 1},
        "team": {"seq": 1, "epoch": 1},
    }
    # carol is no member of the private room; unknown rooms are left out.
    assert config(render(users["carol"], "slugs", slugs=slugs))["rooms"] == {
        "lobby": {"seq": 3, "epoch": 1}
    }


def test_a_room_instance_keeps_the_head_the_view_read(users, rooms):
    lobby = rooms["lobby"]  # loaded at head 0
    services.append_message("lobby", users["alice"], {"n": 1})
    assert config(render(users["alice"], "room", room=lobby))["rooms"] == {
        "lobby": {"seq": 0, "epoch": 1}
    }


def test_room_page_renders_the_newest_messages_up_to_the_embedded_head(client, users, rooms):
    for n in range(55):
        services.append_message("lobby", users["alice"], {"text": f"<b>{n}</b>"})
    client.force_login(users["bob"])
    html = client.get("/rooms/lobby/").content.decode()
    assert config(html)["rooms"] == {"lobby": {"seq": 55, "epoch": 1}}
    match = re.search(r'<script id="initial-messages" type="application/json">(.*?)</script>', html)
    messages = json.loads(match.group(1))
    assert [m["seq"] for m in messages] == list(range(6, 56))  # the newest page of 50
    assert "<b>" not in match.group(1)  # escaped inside the script element
    assert messages[-1]["payload"] == {"text": "<b>54</b>"}
