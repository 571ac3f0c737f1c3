"""The servers under test: a private Redis, a PostgreSQL database and the ASGI processes.

Built on tests/servers.py (the integration tier's helpers): every process is started by this
harness, on a free loopback port, and stopped by its own handle (never by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests import servers
from tests.servers import LOOPBACK, VENV_BIN, Process, ServerError

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


APPS = {
    "realtime": "project.asgi:application",
    "baseline": "bench.baseline.asgi:application",
    "floor": "bench.floor.accept:application",
    "floor-auth": "bench.floor.auth:application",
}


@dataclass
class Server:
    process: Process
    port: int


@dataclass
class Stack:
    """One system under test: its name, its processes, and the URL path of its socket."""

    name: str
    kind: str  # "realtime" (protocol v1 on /ws/), "baseline" (tutorial chat), "floor*" (APPS)
    server: str  # "daphne" or "uvicorn"
    servers: list[Server] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self.servers]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def assert_alive(self) -> None:
        for s in self.servers:
            s.process.assert_alive()


def _answers(port: int) -> bool:
    try:
        servers.http_get(f"http://{LOOPBACK}:{port}/healthz", timeout=2.0)
    except OSError:
        return False
    return True


def _argv(server: str, app: str, port: int) -> list[str]:
    if server == "daphne":
        # The systemd unit's command line (deploy/), so the shipped flags are measured; the
        # floors get the same flags. The tutorial pattern runs daphne as its tutorial does.
        if app != APPS["baseline"]:
            argv = servers.render.daphne_argv(port, str(VENV_BIN / "daphne"))
            return [app if arg == APPS["realtime"] else arg for arg in argv]
        return [str(VENV_BIN / "daphne"), "-b", LOOPBACK, "-p", str(port), app]
    return [
        str(VENV_BIN / "uvicorn"),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--proxy-headers",
        app,
    ]


def start_stack(
    name: str,
    kind: str,
    server: str,
    env: dict[str, str],
    logdir: Path,
    count: int,
    code: Path | None = None,
) -> Stack:
    """``count`` server processes of one stack, each on its own free port; ready on return.

    ``code``: a checkout to serve the application from (its directory first on the path)
    instead of this one; the interpreter and its packages stay this checkout's.
    """
    if code is not None:
        env = dict(env, PYTHONPATH=str(code))
    app = APPS[kind]
    stack = Stack(name=name, kind=kind, server=server)
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(count):
            port = servers.free_port()
            process = servers.start_process(
                f"{name}-{i}:{port}",
                _argv(server, app, port),
                logdir / f"{name.replace('@', '-at-')}-{i}-{port}.log",
                cwd=code or servers.REPO_ROOT,
                env=env,
            )
            stack.servers.append(Server(process, port))
        for s in stack.servers:
            servers.wait_until(
                lambda p=s.port: _answers(p), s.process.name, alive=s.process.assert_alive
            )
    except BaseException:
        stop_stack(stack)
        raise
    return stack


@contextlib.contextmanager
def checkout(ref: str, parent: Path) -> Iterator[Path]:
    """A detached ``git worktree`` of ``ref`` under ``parent``, removed afterwards."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="code-", dir=parent))

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "worktree", *args],
            cwd=servers.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = git("add", "--detach", "--force", str(path), ref)
    if done.returncode != 0:
        raise ServerError(f"cannot check out {ref!r} to compare with: {done.stderr.strip()}")
    try:
        yield path
    finally:
        git("remove", "--force", str(path))


def stop_stack(stack: Stack) -> None:
    for s in stack.servers:
        s.process.stop()


def server_env(database_url: str, redis_url: str, settings: str) -> dict[str, str]:
    """The environment of every server process (production-like: DEBUG off)."""
    env = servers.django_env(database_url, redis_url)
    env.update(
        DJANGO_SETTINGS_MODULE=settings,
        DEBUG="0",
        SECRET_KEY="bench-only-secret-key-not-for-production-0123456789",
        CONN_MAX_AGE=os.environ.get("BENCH_CONN_MAX_AGE", "60"),
    )
    return env


@contextlib.contextmanager
def database() -> Iterator[tuple[str, bool]]:
    """DATABASE_URL when set (kept), else a new PostgreSQL database dropped on exit."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url, False
        return
    with servers.postgres_database() as created:
        yield created, True


def prepare(env: dict[str, str], users: int, rooms: list[str]) -> list[str]:
    """Migrate, then create users with sessions and the rooms; the session cookies."""
    servers.manage(env, "migrate", "--noinput")
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.prepare"],
        input=json.dumps({"users": users, "rooms": rooms}),
        cwd=servers.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise ServerError(f"bench.prepare failed:\n{done.stdout}\n{done.stderr}")
    cookies: list[str] = json.loads(done.stdout)["cookies"]
    return cookies


def wait_idle(stacks: list[Stack], threshold: float = 0.1, cap: float = 15.0) -> float:
    """Wait (at most ``cap`` s) until the stacks use under ``threshold`` of a core; seconds."""
    started = time.monotonic()
    before = sum(s.cpu() for s in stacks)
    while time.monotonic() - started < cap:
        time.sleep(0.5)
        now = sum(s.cpu() for s in stacks)
        if (now - before) / 0.5 < threshold:
            break
        before = now
    return time.monotonic() - started
