"""WebSocket protocol conformance: kosoku runs the Autobahn fuzzing cases against daphne.

The endpoint is ``/autobahn-echo/`` of tests/attack_asgi.py, a plain echo consumer mounted only
in the test servers, served by a real daphne process. Every case must pass (OK, NON-STRICT or
INFORMATIONAL) except those in tests/autobahn_exclude.txt, each listed there with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests import servers

pytestmark = pytest.mark.integration

EXCLUDE_FILE = Path(__file__).with_name("autobahn_exclude.txt")
RUNNER = Path(__file__).with_name("autobahn_run.py")
RUN_TIMEOUT = 300.0  # the whole selection takes about 30 s on 2 cores


def excluded_cases() -> list[str]:
    """The case ids and globs of autobahn_exclude.txt (comments stripped)."""
    cases = []
    for line in EXCLUDE_FILE.read_text().splitlines():
        case = line.split("#", 1)[0].strip()
        if case:
            cases.append(case)
    return cases


def test_exclude_list_gives_a_reason_for_every_case():
    lines = [line for line in EXCLUDE_FILE.read_text().splitlines() if line.strip()]
    entries = [line for line in lines if not line.startswith("#")]
    assert entries and len(entries) == len(excluded_cases())
    for index, line in enumerate(lines):
        if line.startswith("#"):
            continue
        # Either an inline comment or the comment block right above its group.
        above = [prior for prior in lines[:index] if prior.startswith("#")]
        assert "#" in line or above, line


def test_autobahn_cases_pass_against_daphne(tmp_path):
    with servers.running_redis(tmp_path / "redis") as redis:
        env = servers.django_env(tmp_path / "db.sqlite3", redis.url)
        servers.prepare_database(env)
        env["DJANGO_SETTINGS_MODULE"] = "tests.attack_settings"
        with servers.running_daphne(
            env, tmp_path / "logs", "autobahn", application="tests.attack_asgi:application"
        ) as daphne:
            url = f"ws://{servers.LOOPBACK}:{daphne.port}/autobahn-echo/"
            done = subprocess.run(
                [sys.executable, str(RUNNER), url, str(EXCLUDE_FILE)],
                cwd=servers.REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
            log = daphne.process.log()
    assert done.returncode == 0, done.stderr[-5000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [
        f"{r['case']}: {r['behavior']}/{r['close']}: {r['result']} {r['result_close']}"
        for r in results
        if not r["passed"]
    ]
    verdicts = Counter(r["behavior"] for r in results)
    print(f"autobahn: {len(results)} cases, {dict(verdicts)}")
    assert len(results) > 250, f"only {len(results)} cases ran: {done.stderr[-2000:]}"
    assert failed == [], "\n".join(failed)
    assert servers.tracebacks(log) == [], log
