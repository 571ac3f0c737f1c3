"""gcfreeze: the startup heap frozen out of full collections once the ASGI app is built."""

import json
import subprocess
import sys

import pytest

from tests.servers import REPO_ROOT, django_env

# Builds the application twice in a fresh interpreter, as an asgi.py would (once), and
# reports the frozen object counts and whether a cycle made after the freeze is collected.
SCRIPT = """
import gc, json, sys, weakref
import django
django.setup()
from django.conf import settings
settings.REALTIME_GC_FREEZE = sys.argv[1] == "on"
from realtime.routing import get_asgi_application
get_asgi_application()
first = gc.get_freeze_count()
get_asgi_application()
from realtime import gcfreeze
again = gcfreeze.freeze_startup_heap()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
alive = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps([first, gc.get_freeze_count(), again, alive() is not None]))
"""


def frozen_counts(tmp_path, switch):
    env = django_env(tmp_path / "db.sqlite3", "redis://127.0.0.1:1/0")
    env.pop("REDIS_URL")  # the in-memory layer: nothing here connects anywhere
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, switch],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("switch", ["on", "off"])
def test_get_asgi_application_freezes_the_startup_heap_once(tmp_path, switch):
    first, second, again, cycle_survived = frozen_counts(tmp_path, switch)
    if switch == "on":
        # Django, channels and realtime's modules, classes and functions: tens of thousands.
        assert first > 20_000
    else:
        assert first == 0
    # Once per process: the second application freezes nothing (frozen objects can still be
    # freed by reference counting, so the count may only fall).
    assert again == 0
    assert second <= first
    assert not cycle_survived  # objects made after the freeze are collected as before
