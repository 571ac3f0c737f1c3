"""Start and stop the real processes the integration tier runs against.

Everything here is synchronous and loopback-only: a private ``redis-server`` on a free port,
``manage.py migrate`` + ``seed_demo`` into a fresh SQLite file, and ``daphne`` processes serving
``project.asgi:application``. Processes are stopped by their own Popen handle (terminate, then
kill after a timeout), never by name. Each process writes stdout and stderr to a log file, so a
test can show the log and check it for tracebacks.

Use the context managers (``running_redis``, ``running_daphne``, ``realtime_stack``) from
fixtures; every one stops what it started on the way out, failures included.

The deployment tier (``deployed_stack``) runs the shipped topology instead: a private Redis, a
fresh PostgreSQL database per stack (copied from a migrated, seeded template database), daphne
processes started with the command line of deploy/systemd/realtime-daphne@.service, and nginx
running the rendered deploy/nginx templates in front of them.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
DEMO_PASSWORD = "realtime-demo"  # project/management/commands/seed_demo.py
LOOPBACK = "127.0.0.1"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 120.0
HTTP_TIMEOUT = 10.0

# Settings read from the environment by project/settings.py that the tests must control.
_CONTROLLED_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "ALLOWED_HOSTS",
    "DEBUG",
    "SECRET_KEY",
    "CONN_MAX_AGE",
    "REALTIME_ALLOW_ANONYMOUS_READ",
)


class ServerError(RuntimeError):
    """A process could not be started, or answered wrongly."""


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def find_redis_server() -> str:
    """The redis-server binary; fails (never skips) when it is not installed."""
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(path, os.X_OK):
        raise ServerError(
            "redis-server is not installed: the integration tier needs it "
            "(`make system-deps` installs it, or `apt-get install redis-server`)"
        )
    return path


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float = START_TIMEOUT,
    interval: float = 0.05,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``check`` until it returns True; ServerError after ``timeout`` seconds.

    ``alive`` is called before every attempt and should raise when the process died, so a
    crashed server fails at once instead of at the deadline.
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        if alive is not None:
            alive()
        attempts += 1
        if check():
            return
        if time.monotonic() >= deadline:
            raise ServerError(f"{what}: not ready after {timeout:.0f} s ({attempts} attempts)")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


@dataclass
class Process:
    """One started process, its log file, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with contextlib.suppress(FileNotFoundError), self.log_path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
        return ""

    def assert_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ServerError(f"{self.name} (pid {self.pid}) exited with {code}:\n{self.log()}")

    def kill(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGKILL this process (a crash) and reap it; its exit status."""
        self.popen.kill()
        return self.popen.wait(timeout)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM this process and wait for it to exit by itself; its exit status."""
        self.popen.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"{self.name} still running {timeout} s after SIGTERM") from exc

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate this process (and only it); kill it if it ignores SIGTERM."""
        try:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"{self.name} (pid {self.pid}) ignored SIGTERM; killing", file=sys.stderr)
                    self.popen.kill()
                    self.popen.wait(timeout)
        finally:
            close = getattr(self._log_file, "close", None)
            if close is not None:
                close()


def start_process(name: str, argv: list[str], log_path: Path, **popen_kwargs: object) -> Process:
    """Start ``argv`` with stdout and stderr appended to ``log_path``."""
    log_file = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            **popen_kwargs,  # type: ignore[call-overload]
        )
    except BaseException:
        log_file.close()
        raise
    return Process(name=name, popen=popen, log_path=log_path, _log_file=log_file)


# -- redis ---------------------------------------------------------------------------------


@dataclass
class RedisServer:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    """True when a Redis server on ``port`` answers PING with PONG."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(binary: str, workdir: Path, port: int) -> Process:
    return start_process(
        f"redis-server:{port}",
        [
            binary,
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        workdir / f"redis-{port}.log",
        cwd=workdir,
    )


def restart_redis_empty(redis: RedisServer, workdir: Path) -> None:
    """Start a new, empty redis-server on ``redis``'s port (the old one must have exited)."""
    workdir.mkdir(parents=True, exist_ok=True)
    process = _start_redis(find_redis_server(), workdir, redis.port)
    redis.process = process
    wait_until(lambda: redis_ping(redis.port), process.name, alive=process.assert_alive)


@contextlib.contextmanager
def running_redis(workdir: Path, attempts: int = 3) -> Iterator[RedisServer]:
    """A private, non-persistent redis-server on a free loopback port."""
    binary = find_redis_server()
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(attempts):
        port = free_port()
        process = _start_redis(binary, workdir, port)
        try:
            wait_until(lambda p=port: redis_ping(p), process.name, alive=process.assert_alive)
        except ServerError as exc:
            # Most likely another process took the port between free_port() and the bind.
            process.stop()
            last_error = exc
            print(f"attempt {attempt + 1}: {exc}", file=sys.stderr)
            continue
        server = RedisServer(process=process, port=port)
        try:
            yield server
        finally:
            server.process.stop()  # restart_redis_empty may have replaced the process
        return
    raise ServerError(f"could not start redis-server after {attempts} attempts: {last_error}")


# -- django / daphne -----------------------------------------------------------------------


def django_env(database_path: Path | str, redis_url: str) -> dict[str, str]:
    """The environment of every Django subprocess: demo settings, our database and Redis.

    ``database_path`` is a SQLite file, or a database URL (str).
    """
    database_url = database_path if isinstance(database_path, str) else f"sqlite:///{database_path}"
    env = {k: v for k, v in os.environ.items() if k not in _CONTROLLED_ENV}
    env.update(
        # pytest-django exported tests.settings into our own environment; the servers run
        # the demo project's settings, which read the variables below.
        DJANGO_SETTINGS_MODULE="project.settings",
        DATABASE_URL=database_url,  # absolute SQLite path: sqlite:////tmp/...
        REDIS_URL=redis_url,
        ALLOWED_HOSTS=f"{LOOPBACK},localhost",
        DEBUG="1",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def manage(env: dict[str, str], *args: str) -> str:
    """Run ``manage.py`` with ``env``; ServerError with its output when it fails."""
    argv = [str(VENV_BIN / "python"), "manage.py", *args]
    try:
        done = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"manage.py {' '.join(args)} took over {COMMAND_TIMEOUT} s") from exc
    if done.returncode != 0:
        raise ServerError(
            f"manage.py {' '.join(args)} exited with {done.returncode}:\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def prepare_database(env: dict[str, str]) -> None:
    """Create the schema and the demo users and rooms in ``env``'s database."""
    manage(env, "migrate", "--noinput")
    manage(env, "seed_demo")


# Loopback only: never route through a proxy from the environment.
_NO_PROXY = urllib.request.ProxyHandler({})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def http_get(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, str]:
    """GET ``url`` (no redirects followed); (status, body)."""
    opener = urllib.request.build_opener(_NO_PROXY, _NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


WS_OPEN_TIMEOUT = 15.0  # seconds a WebSocket handshake may take


@dataclass
class DaphneServer:
    process: Process
    port: int

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def origin(self) -> str:
        return self.base_url

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws/"

    def websocket(
        self, cookie: str | None = None, origin: str | None = None, **options: Any
    ) -> Any:
        """``async with server.websocket(cookie) as ws``: a websockets client connection with
        this server's Origin (or ``origin``) and the session ``cookie``, no proxy."""
        from websockets.asyncio.client import connect

        headers = {"Origin": origin or self.origin}
        if cookie is not None:
            headers["Cookie"] = cookie
        options.setdefault("open_timeout", WS_OPEN_TIMEOUT)
        options.setdefault("close_timeout", 5)
        return connect(self.ws_url, additional_headers=headers, proxy=None, **options)


def _answers_http(port: int) -> bool:
    try:
        status, _ = http_get(f"http://{LOOPBACK}:{port}/accounts/login/", timeout=2.0)
    except OSError:
        return False
    return status == 200


@contextlib.contextmanager
def running_daphne(
    env: dict[str, str],
    logdir: Path,
    label: str,
    attempts: int = 3,
    application: str = "project.asgi:application",
    server: str = "daphne",
) -> Iterator[DaphneServer]:
    """One daphne process (or ``server="uvicorn"``) serving ``application`` (the demo) on a
    free loopback port."""
    logdir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(attempts):
        port = free_port()
        if server == "uvicorn":
            argv = [str(VENV_BIN / "uvicorn"), "--host", LOOPBACK, "--port", str(port)]
        else:
            argv = [str(VENV_BIN / "daphne"), "-b", LOOPBACK, "-p", str(port)]
        process = start_process(
            f"{server}-{label}:{port}",
            [*argv, application],
            logdir / f"{server}-{label}-{port}.log",
            cwd=REPO_ROOT,
            env=env,
        )
        try:
            wait_until(lambda p=port: _answers_http(p), process.name, alive=process.assert_alive)
        except ServerError as exc:
            process.stop()
            last_error = exc
            print(f"attempt {attempt + 1}: {exc}\n{process.log()}", file=sys.stderr)
            if "Address already in use" not in process.log():
                break  # not a port race: retrying would fail the same way
            continue
        try:
            yield DaphneServer(process=process, port=port)
        finally:
            process.stop()
        return
    raise ServerError(f"could not start {server} {label}: {last_error}")


@dataclass
class RealtimeStack:
    """A private Redis, a seeded SQLite file, and the daphne processes sharing both."""

    redis: RedisServer
    database_path: Path
    env: dict[str, str]
    servers: list[DaphneServer]
    logdir: Path

    def processes(self) -> list[Process]:
        return [self.redis.process, *(s.process for s in self.servers)]


@contextlib.contextmanager
def realtime_stack(workdir: Path, daphnes: int = 2) -> Iterator[RealtimeStack]:
    """Redis + fresh database + ``daphnes`` daphne processes; all stopped on exit."""
    logdir = workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    database_path = workdir / "db.sqlite3"
    with running_redis(workdir / "redis") as redis, contextlib.ExitStack() as stack:
        env = django_env(database_path, redis.url)
        prepare_database(env)
        servers = [
            stack.enter_context(running_daphne(env, logdir, label=chr(ord("A") + i)))
            for i in range(daphnes)
        ]
        yield RealtimeStack(redis, database_path, env, servers, logdir)


def tracebacks(text: str) -> list[str]:
    """The lines of ``text`` that start a Python traceback."""
    return [line for line in text.splitlines() if "Traceback" in line]


# -- logging in over HTTP ------------------------------------------------------------------


def login(server: DaphneServer, username: str, password: str = DEMO_PASSWORD) -> str:
    """Log ``username`` in through the login form; the ``Cookie`` header of its session."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(_NO_PROXY, urllib.request.HTTPCookieProcessor(jar))
    login_url = f"{server.base_url}/accounts/login/"
    with opener.open(login_url, timeout=HTTP_TIMEOUT) as response:
        if response.status != 200:
            raise ServerError(f"GET {login_url}: {response.status}")
    cookies = {c.name: c.value for c in jar}
    if "csrftoken" not in cookies:
        raise ServerError(f"GET {login_url} set no csrftoken cookie: {sorted(cookies)}")
    form = urllib.parse.urlencode(
        {
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": cookies["csrftoken"],
        }
    ).encode()
    request = urllib.request.Request(login_url, data=form, headers={"Referer": login_url})
    try:
        # A successful login redirects (followed by the opener) to LOGIN_REDIRECT_URL.
        with opener.open(request, timeout=HTTP_TIMEOUT) as response:
            final_url, body = response.geturl(), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        raise ServerError(
            f"POST {login_url} as {username}: {exc.code}\n{exc.read()[:2000]!r}"
        ) from exc
    session = {c.name: c.value for c in jar}.get("sessionid")
    if not session:
        raise ServerError(
            f"login as {username} set no sessionid (ended at {final_url}):\n{body[:2000]}"
        )
    return f"sessionid={session}"


# -- the deployed topology: PostgreSQL, daphne per the systemd unit, nginx -----------------


def _load_render() -> types.ModuleType:
    """deploy/render.py (a script directory, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "realtime_deploy_render", REPO_ROOT / "deploy" / "render.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()

PG_ADMIN_URL = os.environ.get(
    "REALTIME_TEST_PG_URL", f"postgresql://postgres@{LOOPBACK}:5432/postgres"
)


def _pg_admin() -> object:
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise ServerError(
            f"PostgreSQL is needed at {PG_ADMIN_URL} (set REALTIME_TEST_PG_URL): {exc}"
        ) from exc


def _pg_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


@contextlib.contextmanager
def postgres_database(template: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database (a copy of ``template`` if given); dropped on exit. Its URL."""
    name = f"realtime_test_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with _pg_admin() as admin:  # type: ignore[attr-defined]
        admin.execute(f'CREATE DATABASE "{name}"{clause}')
        try:
            yield _pg_url(name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_for_pytest_django() -> Iterator[str]:
    """The URL of a fresh database name for a pytest-django run, which creates and drops
    ``test_<name>`` itself; on exit ``test_<name>`` is dropped in case a connection a thread
    left open kept pytest-django from dropping it."""
    name = f"realtime_pg_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as admin:  # type: ignore[attr-defined]
        try:
            yield _pg_url(name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "test_{name}" WITH (FORCE)')


@contextlib.contextmanager
def seeded_postgres_template() -> Iterator[str]:
    """A migrated, seeded database to copy per stack (CREATE DATABASE ... TEMPLATE); its name."""
    with postgres_database() as url:
        # No Redis is needed to migrate and seed; the URL only has to parse.
        prepare_database(django_env(url, f"redis://{LOOPBACK}:1/0"))
        yield url.rsplit("/", 1)[1]


def http_json(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, dict[str, object]]:
    """GET a JSON endpoint; (status, decoded body)."""
    status, body = http_get(url, timeout=timeout)
    try:
        decoded = json.loads(body)
    except ValueError as exc:
        raise ServerError(f"GET {url}: {status} with a non-JSON body {body[:500]!r}") from exc
    return status, decoded


def _healthy(base_url: str) -> bool:
    try:
        status, _ = http_get(f"{base_url}/healthz", timeout=5.0)
    except OSError:
        return False
    return status == 200


def start_daphnes(env: dict[str, str], logdir: Path, labels: list[str]) -> list[DaphneServer]:
    """One daphne per label, run as the systemd unit runs it; returns once all are healthy."""
    logdir.mkdir(parents=True, exist_ok=True)
    daphne = str(VENV_BIN / "daphne")
    started: dict[str, DaphneServer] = {}
    try:
        pending = list(labels)
        for _attempt in range(3):
            batch = {}
            for label in pending:
                port = free_port()
                process = start_process(
                    f"daphne-{label}:{port}",
                    render.daphne_argv(port, daphne),
                    logdir / f"daphne-{label}-{port}.log",
                    cwd=REPO_ROOT,
                    env=env,
                )
                batch[label] = DaphneServer(process=process, port=port)
            pending = []
            for label, server in batch.items():
                try:
                    wait_until(
                        lambda s=server: _healthy(s.base_url),
                        server.name,
                        alive=server.process.assert_alive,
                    )
                except ServerError:
                    server.process.stop()
                    if "Address already in use" not in server.process.log():
                        raise
                    pending.append(label)  # lost a port race: try another port
                else:
                    started[label] = server
            if not pending:
                return [started[label] for label in labels]
        raise ServerError(f"could not start daphne {pending}")
    except BaseException:
        for server in started.values():
            server.process.stop()
        raise


@dataclass
class NginxServer:
    process: Process
    port: int
    prefix: Path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws/"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def find_nginx() -> str:
    """The nginx binary; fails (never skips) when it is not installed."""
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(path, os.X_OK):
        raise ServerError(
            "nginx is not installed: the deployment tier needs it "
            "(`make system-deps` installs it, or `apt-get install nginx`)"
        )
    return path


def start_nginx(workdir: Path, upstream_ports: list[int], static_root: Path) -> NginxServer:
    """nginx running the rendered deploy/nginx templates on a free loopback port."""
    binary = find_nginx()
    upstreams = [f"{LOOPBACK}:{port}" for port in upstream_ports]
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        prefix = workdir / f"nginx-{port}"
        conf = render.write_local_nginx(prefix, upstreams, f"{LOOPBACK}:{port}", str(static_root))
        process = start_process(
            f"nginx:{port}",
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            prefix / "stdout.log",
            cwd=prefix,
        )
        server = NginxServer(process=process, port=port, prefix=prefix)
        try:
            wait_until(
                lambda s=server: _healthy(s.base_url), process.name, alive=process.assert_alive
            )
        except ServerError as exc:
            process.stop()
            last_error = exc
            if "Address already in use" not in server.error_log():
                raise ServerError(f"{exc}\n{server.error_log()}") from exc
            continue
        return server
    raise ServerError(f"could not start nginx: {last_error}")


@dataclass
class DeployedStack:
    """Private Redis, a PostgreSQL database, daphne processes and nginx in front of them."""

    redis: RedisServer
    database_url: str
    env: dict[str, str]
    servers: list[DaphneServer]
    nginx: NginxServer
    workdir: Path

    def processes(self) -> list[Process]:
        return [self.redis.process, *(s.process for s in self.servers), self.nginx.process]

    def logs(self) -> dict[str, str]:
        return {s.name: s.process.log() for s in self.servers}


@contextlib.contextmanager
def deployed_stack(workdir: Path, template_db: str, daphnes: int = 2) -> Iterator[DeployedStack]:
    """The shipped topology on loopback; every process is stopped (by PID) on exit."""
    logdir = workdir / "logs"
    static_root = workdir / "static"
    static_root.mkdir(parents=True, exist_ok=True)
    with (
        running_redis(workdir / "redis") as redis,
        postgres_database(template=template_db) as database_url,
        contextlib.ExitStack() as stack,
    ):
        env = django_env(database_url, redis.url)
        servers = start_daphnes(env, logdir, [chr(ord("A") + i) for i in range(daphnes)])
        for server in servers:
            stack.callback(server.process.stop)
        nginx = start_nginx(workdir, [s.port for s in servers], static_root)
        stack.callback(nginx.process.stop)
        yield DeployedStack(redis, database_url, env, servers, nginx, workdir)
