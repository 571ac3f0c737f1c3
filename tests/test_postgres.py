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
from pathlib import Path

import pytest

from tests import servers

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "tests/test_services.py",
    "tests/test_writer.py",
    "tests/test_protocol.py",
    "tests/test_publishing.py",
    "tests/test_sessionauth.py",
]


@pytest.fixture
def database_url():
    with servers.postgres_for_pytest_django() as url:
        yield url


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
