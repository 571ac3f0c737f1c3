"""Shared fixtures: demo users and rooms, and a fresh hub per test event loop."""

from __future__ import annotations

import pytest
from channels.layers import get_channel_layer

from realtime import broker, presence
from realtime.models import Membership, Room

from .wsclient import Client


@pytest.fixture
def users(django_user_model):
    """alice, bob, carol (plain users), staff (is_staff) and root (superuser)."""
    made = {
        name: django_user_model.objects.create_user(username=name, password="pw-" + name)
        for name in ("alice", "bob", "carol")
    }
    made["staff"] = django_user_model.objects.create_user(
        username="staff", password="pw-staff", is_staff=True
    )
    made["root"] = django_user_model.objects.create_superuser(username="root", password="pw-root")
    return made


@pytest.fixture
def rooms(users):
    """lobby (public), team (private: alice member, bob moderator), news (announce)."""
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    team = Room.objects.create(slug="team", kind=Room.Kind.PRIVATE)
    news = Room.objects.create(slug="news", kind=Room.Kind.ANNOUNCE)
    Membership.objects.create(room=team, user=users["alice"])
    Membership.objects.create(room=team, user=users["bob"], role=Membership.Role.MODERATOR)
    return {"lobby": lobby, "team": team, "news": news}


@pytest.fixture
async def hub():
    """The running loop's hub on a flushed in-memory layer; its tasks end with the test."""
    layer = get_channel_layer()
    await layer.flush()
    presence._memory.conns.clear()
    presence._memory.info.clear()
    current = broker.get_hub()
    yield current
    await current.close()


@pytest.fixture
async def connect():
    opened = []

    async def make(user):
        client = Client(user)
        await client.open()
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()
