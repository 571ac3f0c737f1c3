"""The benchmark harness (bench/, `make bench`) still runs: tiny sizes, a trivial rate.

No timing is asserted here (figures belong to `make bench` and docs/performance.md); only
that the harness starts its stacks, drives every scenario and reports what it promises, and
that at a trivial load nothing is lost, duplicated or reordered on either stack.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests import servers

pytestmark = pytest.mark.integration

TINY = {
    "BENCH_STACKS": "realtime,baseline,floor,floor-auth",
    "BENCH_SCENARIOS": "idle,fanout,rooms,sends",
    "BENCH_USERS": "5",
    "BENCH_FANOUT_SIZES": "6",
    "BENCH_FANOUT_RATES": "30",
    "BENCH_FIXED_RATES": "30",
    "BENCH_ROOMS_CLIENTS": "10",
    "BENCH_ROOM_SIZE": "5",
    "BENCH_ROOMS_RATE": "1",
    "BENCH_ROOMS_SECONDS": "2",
    "BENCH_IDLE_CONNECTIONS": "20",
    "BENCH_SENDS_SENDERS": "2",
    "BENCH_SENDS_ROOMS": "2",
    "BENCH_STEP_SECONDS": "2",
    "BENCH_DRAIN_SECONDS": "5",
}

STEP_KEYS = {
    "deliveries_per_s",
    "server_cpu_us_per_delivery",
    "redis_cpu_us_per_delivery",
    "generator_cpu_us_per_delivery",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "lost",
    "duplicates",
    "out_of_order",
    "rss_mb",
}


def _bench(results, **overrides):
    """``python -m bench`` at the TINY sizes (plus ``overrides``), results in ``results``."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(TINY, BENCH_RESULTS=str(results), **overrides)
    return subprocess.run(
        [str(servers.VENV_BIN / "python"), "-m", "bench"],
        cwd=servers.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench")
    done = _bench(results)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads((results / "bench.json").read_text())
    data["stdout"] = done.stdout
    return data


def rows(report, scenario):
    return [r for r in report["rows"] if r["scenario"] == scenario]


def test_every_scenario_reports_both_stacks(report):
    assert {r["stack"] for r in rows(report, "fanout-6")} == {"realtime", "baseline"}
    assert {r["stack"] for r in rows(report, "rooms")} == {"realtime", "baseline"}
    assert {r["stack"] for r in rows(report, "sends")} == {"realtime"}  # tutorial: no acks


def test_the_floors_take_part_in_the_idle_scenario_only(report):
    idle = {r["stack"]: r for r in rows(report, "idle")}
    assert set(idle) == {"realtime", "baseline", "floor", "floor-auth"}
    # floor-auth refuses anonymous handshakes: every one of these carried a valid session.
    assert idle["floor-auth"]["connections"] == idle["floor"]["connections"] == 20
    figures = {item["figure"]: item["values"] for item in report["summary"]}
    assert set(figures["idle connections/s (auth + join)"]) == set(idle)
    assert "floor" not in figures["rooms p99 ms"]  # no None entries for stacks that did not run


async def test_the_auth_floor_refuses_an_anonymous_handshake():
    from django.contrib.auth.models import AnonymousUser

    from bench.floor import auth

    sent = []
    messages = iter([{"type": "websocket.connect"}])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    await auth._logged_in_only({"user": AnonymousUser()}, receive, send)
    assert sent == [{"type": "websocket.close"}]


def test_step_rows_carry_the_promised_figures(report):
    for row in rows(report, "fanout-6") + rows(report, "rooms") + rows(report, "sends"):
        assert set(row) >= STEP_KEYS, row
    for row in rows(report, "idle"):
        assert {"connections_per_s", "rss_kb_per_connection", "connections"} <= set(row)
        assert row["connections"] == 20


def test_nothing_lost_duplicated_or_reordered_at_a_trivial_rate(report):
    for row in rows(report, "fanout-6") + rows(report, "rooms") + rows(report, "sends"):
        assert row["deliveries"] == row["expected"] > 0, row
        assert (row["lost"], row["duplicates"], row["out_of_order"], row["errors"]) == (0, 0, 0, 0)


def test_steps_carry_the_databases_own_commit_latency(report):
    # The probe commits on its own connection all through each step (bench/dbprobe.py).
    for row in rows(report, "fanout-6") + rows(report, "rooms") + rows(report, "sends"):
        assert 0 < row["db_commit_p99_ms"] <= row["db_commit_max_ms"], row
    assert "db max ms" in report["stdout"]


def test_sends_are_acked(report):
    (sends,) = rows(report, "sends")
    assert sends["acks"] > 0 and sends["acked_sends_per_s"] > 0


def test_summary_table_and_targets_are_printed(report):
    assert "== targets" in report["stdout"]
    assert {"figure", "values", "target", "met"} <= set(report["summary"][0])
    assert report["meta"]["config"]["fanout_sizes"] == [6]


def _worktrees():
    listed = subprocess.run(
        ["git", "worktree", "list", "--porcelain"],
        cwd=servers.REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split(" ", 1)[1] for line in listed.splitlines() if line.startswith("worktree ")}


def test_a_git_ref_runs_as_its_own_stack_beside_the_working_tree(tmp_path):
    before = _worktrees()
    done = _bench(tmp_path, BENCH_STACKS="realtime,realtime@HEAD", BENCH_SCENARIOS="idle")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    idle = {r["stack"]: r for r in data["rows"] if r["scenario"] == "idle"}
    assert set(idle) == {"realtime", "realtime@HEAD"}
    assert all(r["connections"] == 20 for r in idle.values())
    assert data["meta"]["stacks"]["realtime@HEAD"] == {"kind": "realtime", "server": "daphne"}
    logs = list((tmp_path / "work" / "logs").glob("realtime-at-HEAD-*.log"))
    assert len(logs) == 2
    assert _worktrees() == before  # the checkout is gone


def test_unknown_stacks_and_refs_are_refused_with_a_clear_message(tmp_path):
    done = _bench(tmp_path, BENCH_STACKS="realtime,tornado")
    assert done.returncode != 0
    assert "unknown stack 'tornado'" in done.stderr
    done = _bench(tmp_path, BENCH_STACKS="realtime@no-such-ref-xyz", BENCH_SCENARIOS="idle")
    assert done.returncode != 0
    assert "cannot check out 'no-such-ref-xyz'" in done.stdout + done.stderr


async def test_commit_probe_measures_only_a_postgresql_database():
    from bench.dbprobe import CommitProbe

    probe = CommitProbe("sqlite:///db.sqlite3")
    probe.start()
    assert await probe.stop() == {"db_commit_p99_ms": None, "db_commit_max_ms": None}
