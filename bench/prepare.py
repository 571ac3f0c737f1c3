"""Create the benchmark's users, logged-in sessions and rooms; print the session cookies.

Run with the demo project's settings (``python -m bench.prepare``, reading a JSON request on
stdin: ``{"users": N, "rooms": [slug, ...]}``). Users get unusable passwords and sessions are
written directly, because hashing a password per user would dominate the set-up time; the
sessions are ordinary Django sessions, so connecting still goes through session auth.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.sessions.backends.db import SessionStore

    from realtime.models import Room

    request = json.load(sys.stdin)
    User = get_user_model()
    cookies = []
    for i in range(int(request["users"])):
        user, created = User.objects.get_or_create(username=f"bench{i}")
        if created:
            user.set_unusable_password()
            user.save()
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        cookies.append(f"sessionid={session.session_key}")
    existing = set(Room.objects.values_list("slug", flat=True))
    Room.objects.bulk_create(
        [Room(slug=slug, title=slug) for slug in request["rooms"] if slug not in existing]
    )
    json.dump({"cookies": cookies}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
