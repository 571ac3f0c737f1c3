"""The store's tests again, on PostgreSQL: append_messages' pipelined path (realtime/pgbatch.py)
runs only there, and the consumer's send path goes through it end to end.

The rest of the suite runs on SQLite (tests/settings.py); this runs the modules below in a
pytest subprocess with REALTIME_TEST_DATABASE_URL pointing at a throwaway database on the
PostgreSQL server of REALTIME_TEST_PG_URL (default: the local one).
"""

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "REALTIME_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MODULES = [
    "tests/test_services.py",
    "tests/test_writer.py",
    "tests/test_protocol.py",
    "tests/test_publishing.py",
]


@pytest.fixture
def database_url():
    name = f"realtime_pg_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed at {PG_ADMIN_URL} (REALTIME_TEST_PG_URL): {exc}")
    with admin:
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            # pytest-django creates and drops test_<name>; a thread's connection left open at
            # exit can keep it from dropping, so make sure.
            admin.execute(f'DROP DATABASE IF EXISTS "test_{name}" WITH (FORCE)')


def test_store_tests_pass_on_postgresql(database_url):
    env = {**os.environ, "REALTIME_TEST_DATABASE_URL": database_url}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODULES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed is not None and int(passed.group(1)) >= 100, tail
    assert not re.search(r"\d+ (failed|skipped|error)", run.stdout), tail
