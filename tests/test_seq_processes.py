"""Seq allocation from several OS processes at once, on SQLite (WAL) and on PostgreSQL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import servers

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, os, sys
import django
os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
django.setup()
from django.contrib.auth import get_user_model
from realtime.services import append_message
user = get_user_model().objects.get(username="alice")
sys.stdin.readline()  # start together
n = int(sys.argv[1])
seqs = [append_message("lobby", user, {"n": i}).message["seq"] for i in range(n)]
print(json.dumps(seqs))
"""


def manage(env, *args):
    subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite3'}"
        return
    with servers.postgres_database() as url:
        yield url


def test_processes_never_share_or_skip_a_seq(database_url):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": database_url,
        "DEBUG": "1",
    }
    manage(env, "migrate", "--noinput")
    manage(env, "seed_demo")
    per_process, processes = 60, 3
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(per_process)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outputs = []
    try:
        # Wait until every worker has set Django up, then release them together.
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            outputs.append(json.loads(out))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    every = sorted(seq for seqs in outputs for seq in seqs)
    assert every == list(range(1, per_process * processes + 1))
    for seqs in outputs:
        assert seqs == sorted(seqs)  # each process saw its own seqs increase
