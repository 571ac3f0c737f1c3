"""``make bench``: realtime against the Channels tutorial pattern, same load, same machine.

Starts a private Redis, a PostgreSQL database (or uses DATABASE_URL), 2 daphne processes
serving realtime, 2 daphne processes serving the tutorial consumer (bench/baseline/), 2
uvicorn processes serving realtime and, for the idle scenario only, 2 + 2 daphne processes
serving the floors (bench/floor/: a bare accept, and one behind realtime's session auth);
runs the scenarios with the stacks interleaved per step; prints the comparison and writes
results/bench.json and results/bench.png. Sizes and durations come from BENCH_* environment
variables (see docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench import profile, report
from bench.load import Generator
from bench.scenarios import TRAFFIC_KINDS, Config, Runner, room_name
from bench.stacks import (
    Stack,
    checkout,
    database,
    prepare,
    server_env,
    start_stack,
    stop_stack,
)
from tests import servers

STACKS = {
    # name: (kind, server)
    "realtime": ("realtime", "daphne"),
    "baseline": ("baseline", "daphne"),
    "uvicorn": ("realtime", "uvicorn"),
    # Idle scenario only (bench/floor/): daphne accepting, bare and behind realtime's session auth.
    "floor": ("floor", "daphne"),
    "floor-auth": ("floor-auth", "daphne"),
}
DEFAULT_STACKS = "realtime,baseline,uvicorn,floor,floor-auth"


def stack_kind(name: str) -> tuple[str, str]:
    """(kind, server) of a stack name: one of STACKS, or ``<one of STACKS>@<git ref>``."""
    base = name.split("@", 1)[0]
    if base not in STACKS:
        known = ", ".join(STACKS)
        raise SystemExit(f"bench: unknown stack {name!r}; known: {known}, or <stack>@<git ref>")
    return STACKS[base]


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def _num(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def config() -> Config:
    return Config(
        step_seconds=_num("BENCH_STEP_SECONDS", 5),
        drain_seconds=_num("BENCH_DRAIN_SECONDS", 3),
        p99_limit_ms=_num("BENCH_P99_LIMIT_MS", 250),
        users=int(_num("BENCH_USERS", 100)),
        publishers=int(_num("BENCH_PUBLISHERS", 2)),
        fanout_sizes=_ints("BENCH_FANOUT_SIZES", "100,1000"),
        fanout_rates=_ints(
            "BENCH_FANOUT_RATES", "500,1000,2500,5000,7500,10000,15000,20000,30000,40000,60000"
        ),
        fixed_rates=_ints("BENCH_FIXED_RATES", "1000,5000"),
        rooms_clients=int(_num("BENCH_ROOMS_CLIENTS", 1000)),
        room_size=int(_num("BENCH_ROOM_SIZE", 10)),
        rooms_rate=_num("BENCH_ROOMS_RATE", 0.5),
        rooms_seconds=_num("BENCH_ROOMS_SECONDS", 10),
        idle_connections=int(_num("BENCH_IDLE_CONNECTIONS", 3000)),
        idle_concurrency=int(_num("BENCH_IDLE_CONCURRENCY", 50)),
        sends_senders=int(_num("BENCH_SENDS_SENDERS", 40)),
        sends_rooms=int(_num("BENCH_SENDS_ROOMS", 8)),
    )


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        print(f"warning: RLIMIT_NOFILE {soft} < {needed} sockets needed", file=sys.stderr)
    return soft


def rooms_needed(cfg: Config, names: list[str]) -> list[str]:
    bases = [f"fan-{n}" for n in cfg.fanout_sizes]
    bases += [f"room-{k}" for k in range(-(-cfg.rooms_clients // cfg.room_size))]
    bases += [f"idle-{k}" for k in range(100)]
    bases += [f"send-{k}" for k in range(cfg.sends_rooms)]
    return [room_name(base, name) for name in names for base in bases]


def _row(rows: list[dict[str, Any]], scenario: str, stack: str, step: str | None = None) -> Any:
    for row in rows:
        matches = row["scenario"] == scenario and row["stack"] == stack
        if matches and (step is None or row["step"] == step):
            return row
    return None


def summarise(
    rows: list[dict[str, Any]], saturation: dict[str, dict[str, int]], names: list[str]
) -> list[dict[str, Any]]:
    """The issue's targets, each with every stack's figure; ``met`` judges ``realtime``."""
    items: list[dict[str, Any]] = []

    def add(figure: str, values: dict[str, Any], target: str, met: bool | None) -> None:
        # Stacks without the figure (the floors outside the idle scenario) are left out.
        values = {name: value for name, value in values.items() if value is not None}
        items.append({"figure": figure, "values": values, "target": target, "met": met})

    big = max((int(s.split("-")[1]) for s in saturation), default=0)
    fan = f"fanout-{big}"
    if big:
        at = {n: _row(rows, fan, n, "5000/s") for n in names}
        cpu = {n: (r["server_cpu_us_per_delivery"] if r else None) for n, r in at.items()}
        add(f"{fan} server µs/delivery @5000/s", cpu, "<= 40 (stretch 20)", _le(cpu, 40))
        p99 = {n: (r["p99_ms"] if r else None) for n, r in at.items()}
        add(f"{fan} p99 ms @5000/s", p99, "<= 50", _le(p99, 50))
        sat = {n: saturation[fan].get(n) for n in names}
        base = sat.get("baseline") or 0
        ratio = (sat.get("realtime") or 0) / base if base else None
        add(f"{fan} saturation deliveries/s", sat, ">= 8x baseline", None)
        if ratio is not None:
            add(f"{fan} saturation vs baseline", {"realtime": f"{ratio:.1f}x"}, ">= 8x", ratio >= 8)
        elif sat.get("realtime"):
            # The baseline passed no step: the ratio is only bounded from below.
            low = min(r for r in (cfg_rates(rows, fan) or [1]))
            add(
                f"{fan} saturation vs baseline",
                {"realtime": f"> {sat['realtime'] / low:.1f}x (baseline passed no step)"},
                ">= 8x",
                None,
            )
        gen = {n: (r["generator_cpu_us_per_delivery"] if r else None) for n, r in at.items()}
        add(f"{fan} generator µs/delivery @5000/s", gen, "(info)", None)
    for scenario in sorted(saturation):
        if scenario != fan:
            add(f"{scenario} saturation deliveries/s", dict(saturation[scenario]), "(info)", None)
    rooms = {n: _row(rows, "rooms", n) for n in names}
    if any(rooms.values()):
        bad = {
            n: (r["lost"] + r["duplicates"] + r["out_of_order"] if r else None)
            for n, r in rooms.items()
        }
        add("rooms lost + dup + out-of-order", bad, "0", _le(bad, 0))
        p99 = {n: (r["p99_ms"] if r else None) for n, r in rooms.items()}
        add("rooms p99 ms", p99, "<= 50", _le(p99, 50))
    idle = {n: _row(rows, "idle", n) for n in names}
    if any(idle.values()):
        kb = {n: (r["rss_kb_per_connection"] if r else None) for n, r in idle.items()}
        add("idle KB per connection", kb, "<= 35", _le(kb, 35))
        cps = {n: (r["connections_per_s"] if r else None) for n, r in idle.items()}
        add("idle connections/s (auth + join)", cps, ">= 1500", _ge(cps, 1500))
    sends = {n: _row(rows, "sends", n) for n in names}
    if any(sends.values()):
        acked = {n: (r["acked_sends_per_s"] if r else None) for n, r in sends.items()}
        add("sends acked+persisted/s", acked, ">= 1500", _ge(acked, 1500))
    return items


def cfg_rates(rows: list[dict[str, Any]], scenario: str) -> list[int]:
    """The offered rates that ran in a fan-out scenario."""
    return [int(r["offered_per_s"]) for r in rows if r["scenario"] == scenario]


def _le(values: dict[str, Any], limit: float) -> bool | None:
    value = values.get("realtime")
    return None if value is None else value <= limit


def _ge(values: dict[str, Any], limit: float) -> bool | None:
    value = values.get("realtime")
    return None if value is None else value >= limit


async def run_scenarios(
    stacks: list[Stack],
    cookies: list[str],
    redis_pid: int,
    cfg: Config,
    results: Path,
    database_url: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]], dict[str, Any], dict[str, Any]]:
    gen = Generator()
    runner = Runner(gen, stacks, cookies, redis_pid, cfg, database_url)
    rows: list[dict[str, Any]] = []
    saturation: dict[str, dict[str, int]] = {}
    profiles: dict[str, Any] = {}

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        keys = ("deliveries_per_s", "server_cpu_us_per_delivery", "p99_ms", "lost")
        brief = ", ".join(f"{k}={row[k]}" for k in keys if k in row)
        extra = ", ".join(
            f"{k}={row[k]}"
            for k in ("connections_per_s", "rss_kb_per_connection", "acked_sends_per_s")
            if k in row
        )
        print(f"  {row['scenario']:<12} {row['step']:<24} {row['stack']:<10} {brief}{extra}")
        sys.stdout.flush()

    scenarios = os.environ.get("BENCH_SCENARIOS", "idle,fanout,rooms,sends,profile").split(",")
    started = time.monotonic()
    spying = os.environ.get("BENCH_PYSPY") == "1" and profile.py_spy() is not None
    for scenario in scenarios:
        print(f"-- {scenario} ({time.monotonic() - started:.0f} s in)")
        spy = StepSpy(runner, cfg, results, scenario) if spying and scenario != "profile" else None
        if scenario == "idle":
            await runner.idle(record)
        elif scenario == "fanout":
            for size in cfg.fanout_sizes:
                saturation[f"fanout-{size}"] = await runner.fanout(size, record)
        elif scenario == "rooms":
            await runner.rooms(record)
        elif scenario == "sends":
            await runner.sends(record)
        elif scenario == "profile":
            profiles = await profile_fanout(runner, stacks, cfg, results)
        if spy is not None:
            spy.report()
    if gen.unexpected:
        print(f"unexpected replies: {dict(gen.unexpected)}")
    if gen.failed_connects:
        print(f"clients that could not connect: {dict(gen.failed_connects)}")
    for row in rows:
        # Deliveries that came after their step's drain (while later steps ran).
        step = gen.steps.get(row.pop("step_id", -1))
        if step is not None and "lost" in row:
            row["late"] = step.late
            row["lost"] = max(0, row["lost"] - step.late)
    problems = {"unexpected": dict(gen.unexpected), "failed_connects": dict(gen.failed_connects)}
    return rows, saturation, profiles, problems


async def profile_fanout(
    runner: Runner, stacks: list[Stack], cfg: Config, results: Path
) -> dict[str, Any]:
    """py-spy on each daphne stack's processes during one extra fan-out step (not reported)."""
    rate = int(_num("BENCH_PROFILE_RATE", 5000))
    size = max(cfg.fanout_sizes)
    out: dict[str, Any] = {}
    if profile.py_spy() is None or os.geteuid() != 0:
        print("  profile skipped: py-spy needs to be installed and run as root")
        return out
    saved = (runner.stacks, cfg.fanout_rates, cfg.fixed_rates)
    cfg.fanout_rates, cfg.fixed_rates = [rate], [rate]
    procs: list[Any] = []

    def attach(stack: Stack) -> None:
        procs.extend(profile.start(stack.pids, cfg.step_seconds, results, stack.name))

    runner.on_step = attach
    try:
        for stack in stacks:
            if stack.server != "daphne" or stack.kind not in TRAFFIC_KINDS:
                continue
            runner.stacks = [stack]
            await runner.fanout(size, lambda row: None)
            profile.finish(procs)
            procs.clear()
            files = [profile.profile_path(results, stack.name, pid) for pid in stack.pids]
            out[stack.name] = {"rate": rate, "subscribers": size, **profile.summarise(files)}
    finally:
        runner.on_step = None
        runner.stacks, cfg.fanout_rates, cfg.fixed_rates = saved
        profile.finish(procs)
    return out


class StepSpy:
    """BENCH_PYSPY=1: py-spy on the server processes during every step of one scenario."""

    def __init__(self, runner: Runner, cfg: Config, results: Path, scenario: str) -> None:
        self.runner, self.cfg, self.results, self.scenario = runner, cfg, results, scenario
        self.procs: list[Any] = []
        self.files: list[Path] = []
        runner.on_step = self.attach

    def attach(self, stack: Stack) -> None:
        profile.finish(self.procs)
        self.procs.clear()
        label = f"{self.scenario}-{stack.name}-{len(self.files)}"
        self.procs.extend(profile.start(stack.pids, self.cfg.step_seconds, self.results, label))
        self.files.extend(profile.profile_path(self.results, label, pid) for pid in stack.pids)

    def report(self) -> None:
        profile.finish(self.procs)
        self.runner.on_step = None
        summary = profile.summarise(self.files, top=25)
        print(f"  py-spy over {self.scenario}: own | inclusive (files in {self.results})")
        for own, incl in zip(summary["own"], summary["inclusive"], strict=False):
            print(
                f"  {own['percent']:5.1f}% {own['frame'][:70]:<70}"
                f" | {incl['percent']:5.1f}% {incl['frame'][:70]}"
            )


def main() -> int:
    cfg = config()
    results = Path(os.environ.get("BENCH_RESULTS", servers.REPO_ROOT / "results"))
    results.mkdir(parents=True, exist_ok=True)
    workdir = results / "work"
    names = [n.strip() for n in os.environ.get("BENCH_STACKS", DEFAULT_STACKS).split(",")]
    if len(set(names)) != len(names):
        raise SystemExit(f"bench: a stack is named twice in BENCH_STACKS: {names}")
    for name in names:
        stack_kind(name)
    per_server = int(_num("BENCH_SERVERS", 2))
    needed = len(names) * max([*cfg.fanout_sizes, cfg.idle_connections, cfg.rooms_clients]) + 500
    nofile = raise_nofile(needed)
    began = time.monotonic()
    print(f"bench: stacks {names}, {per_server} processes each; results in {results}")
    with contextlib.ExitStack() as exit_stack:
        redis = exit_stack.enter_context(servers.running_redis(workdir / "redis"))
        database_url, created = exit_stack.enter_context(database())
        print(f"  redis :{redis.port}, database {'created' if created else 'from DATABASE_URL'}")
        env = server_env(database_url, redis.url, "project.settings")
        with_rooms = [n for n in names if stack_kind(n)[0] in TRAFFIC_KINDS]
        cookies = prepare(env, cfg.users, rooms_needed(cfg, with_rooms))
        stacks: list[Stack] = []
        for name in names:
            kind, server = stack_kind(name)
            settings = "bench.baseline.settings" if kind == "baseline" else "bench.settings"
            # Separate Redis databases, so the stacks never see each other's groups.
            db = names.index(name)
            stack_env = server_env(database_url, f"{redis.url.rsplit('/', 1)[0]}/{db}", settings)
            # name@ref: the same stack, served from a checkout of that git ref (A/B runs).
            code = None
            if "@" in name:
                code = exit_stack.enter_context(checkout(name.split("@", 1)[1], workdir))
            stack = start_stack(name, kind, server, stack_env, workdir / "logs", per_server, code)
            exit_stack.callback(stop_stack, stack)
            stacks.append(stack)
        print(f"  servers up after {time.monotonic() - began:.0f} s")
        loop_factory = None
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            rows, saturation, profiles, problems = runner.run(
                run_scenarios(stacks, cookies, redis.process.pid, cfg, results, database_url)
            )
        logs = {
            s.process.name: servers.tracebacks(s.process.log()) for st in stacks for s in st.servers
        }
    summary = summarise(rows, saturation, names)
    elapsed = time.monotonic() - began
    data = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "stacks": {n: dict(zip(("kind", "server"), stack_kind(n), strict=True)) for n in names},
            "processes_per_stack": per_server,
            "config": cfg.__dict__,
            "database": "postgresql" if "postgres" in database_url else database_url.split(":")[0],
            "conn_max_age": os.environ.get("BENCH_CONN_MAX_AGE", "60"),
            "rlimit_nofile": nofile,
            "elapsed_s": round(elapsed, 1),
        },
        "rows": rows,
        "saturation": saturation,
        "summary": summary,
        "profiles": profiles,
        "problems": problems,
        "tracebacks": {k: len(v) for k, v in logs.items()},
    }
    report.write_json(results / "bench.json", data)
    drew = report.chart(results / "bench.png", rows, saturation)
    print(report.table(rows))
    print("\n== targets (issue 8; 'met' judges realtime on daphne) ==")
    print(report.summary_table(summary))
    for name, prof in profiles.items():
        print(f"\n== py-spy: {name}, fan-out {prof['subscribers']} at {prof['rate']}/s ==")
        for entry in prof["own"][:12]:
            print(f"  {entry['percent']:5.1f}%  {entry['frame']}")
    print(f"\nwrote {results / 'bench.json'}" + (f" and {results / 'bench.png'}" if drew else ""))
    print(f"bench finished in {elapsed:.0f} s")
    return 0
