"""Create the demo users and rooms; safe to run any number of times."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from realtime.models import Membership, Room

DEMO_PASSWORD = "realtime-demo"
USERS = ["alice", "bob", "carol"]
ROOMS = [
    ("lobby", "Lobby", Room.Kind.PUBLIC),
    ("team", "Team (alice and bob)", Room.Kind.PRIVATE),
    ("announcements", "Announcements", Room.Kind.ANNOUNCE),
]


class Command(BaseCommand):
    help = "Seed demo users (alice, bob, carol, admin) and rooms (lobby, team, announcements)."

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        users = {}
        for name in USERS:
            user, created = User.objects.get_or_create(username=name)
            if created:
                user.set_password(DEMO_PASSWORD)
                user.save()
            users[name] = user
        admin, created = User.objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            admin.set_password(DEMO_PASSWORD)
            admin.save()
        rooms = {}
        for slug, title, kind in ROOMS:
            rooms[slug], _ = Room.objects.get_or_create(
                slug=slug, defaults={"title": title, "kind": kind}
            )
        for name in ("alice", "bob"):
            Membership.objects.get_or_create(room=rooms["team"], user=users[name])
        self.stdout.write(
            f"Demo ready. Log in as alice, bob, carol or admin (superuser); "
            f"password for all: {DEMO_PASSWORD}"
        )
