"""ASGI entry point: Django's HTTP app (with static files for the demo) plus realtime."""

from __future__ import annotations

import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application as django_asgi

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

# Set Django up (django_asgi does) before importing anything that touches models.
django_asgi_app = django_asgi()

from realtime.routing import get_asgi_application  # noqa: E402

# The demo serves its own static files; behind nginx, serve STATIC_ROOT there instead.
application = get_asgi_application(ASGIStaticFilesHandler(django_asgi_app))
