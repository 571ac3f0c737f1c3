"""Test settings: the demo project's, with a file SQLite database threads can share.

REALTIME_TEST_DATABASE_URL (a PostgreSQL URL) replaces it: tests/test_postgres.py runs the
store's tests that way, so both of append_messages' paths are tested.
"""

import os
import tempfile
from pathlib import Path

from project.settings import *  # noqa: F403

# A file (not :memory:) so that database_sync_to_async threads share it; one per pytest
# process so that concurrent runs never meet.
_TEST_DB = Path(tempfile.gettempdir()) / f"realtime-test-{os.getpid()}.sqlite3"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _TEST_DB,
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
        "TEST": {"NAME": _TEST_DB},
    }
}
if os.environ.get("REALTIME_TEST_DATABASE_URL"):
    import dj_database_url

    DATABASES = {"default": dj_database_url.parse(os.environ["REALTIME_TEST_DATABASE_URL"])}

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# The test process builds ASGI applications in-process; its heap is pytest's, not a server's
# (tests/test_gcfreeze.py checks the freeze in a process of its own).
REALTIME_GC_FREEZE = False
