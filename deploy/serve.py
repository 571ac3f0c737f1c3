"""`make serve`: the production topology on loopback, from the files in deploy/.

Starts a private redis-server (unless REDIS_URL is set), DAPHNES daphne processes (default 2)
run with the systemd unit's command line, and nginx running the rendered nginx templates on
HOST:PORT; stops all of them (daphne first, which drains its clients) on Ctrl-C or SIGTERM.

Environment: HOST (127.0.0.1), PORT (8000, nginx), DAPHNES (2; daphne listens on PORT+1 ..
PORT+DAPHNES), REDIS_URL, DATABASE_URL (unset: the SQLite file of `make run`; use PostgreSQL
for anything beyond a demo, see docs/deployment.md), NGINX (the nginx binary).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType

import render

ROOT = render.DEPLOY_DIR.parent
BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0  # above realtime.drain.DRAIN_TIMEOUT


class Stop(Exception):
    """Ctrl-C or SIGTERM."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait(check: object, what: str, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    interval = 0.05
    while True:
        for process in processes:
            if process.poll() is not None:
                raise SystemExit(f"{what}: a process exited with {process.returncode}")
        if check():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not ready after {START_TIMEOUT:.0f} s")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=env, check=True)


def main() -> int:
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    count = int(os.environ.get("DAPHNES", "2"))
    nginx = os.environ.get("NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    daphne_ports = [port + 1 + i for i in range(count)]
    busy = [p for p in [port, *daphne_ports] if not _port_free(host, p)]
    if count < 1 or busy:
        raise SystemExit(f"DAPHNES must be >= 1 and these ports free: {busy} are taken")

    env = dict(os.environ, DJANGO_SETTINGS_MODULE="project.settings", PYTHONUNBUFFERED="1")
    hosts = {h for h in env.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h}
    env["ALLOWED_HOSTS"] = ",".join(sorted(hosts | {host}))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # Children get their own process group: Ctrl-C reaches only this script, which stops them
    # in order (daphne first, so that it can drain through a still running nginx and Redis).
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    workdir = Path(tempfile.mkdtemp(prefix="realtime-serve-"))

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
        started.append((name, process))
        return process

    try:
        if not env.get("REDIS_URL"):
            redis_port = _free_port(host)
            redis = start(
                "redis-server",
                [shutil.which("redis-server") or "redis-server", "--bind", host,
                 "--port", str(redis_port), "--save", "", "--appendonly", "no",
                 "--dir", str(workdir)],
            )  # fmt: skip
            env["REDIS_URL"] = f"redis://{host}:{redis_port}/0"
            _wait(lambda: not _port_free(host, redis_port), "redis-server", [redis])
        if not env.get("DATABASE_URL"):
            print("DATABASE_URL is unset: using the SQLite file (set it to a PostgreSQL URL).")
        _manage(env, "migrate", "--noinput")
        _manage(env, "seed_demo")
        _manage(env, "collectstatic", "--noinput", "--verbosity", "0")
        daphnes = [
            start(f"daphne:{p}", render.daphne_argv(p, str(BIN / "daphne"))) for p in daphne_ports
        ]
        for p in daphne_ports:
            _wait(lambda p=p: _healthy(f"http://{host}:{p}/healthz"), f"daphne:{p}", daphnes)
        upstreams = [f"{host}:{p}" for p in daphne_ports]
        static_root = str(ROOT / "staticfiles")
        conf = render.write_local_nginx(workdir / "nginx", upstreams, f"{host}:{port}", static_root)
        prefix = str(conf.parent)
        proxy = start("nginx", [nginx, "-p", prefix, "-c", str(conf), "-e", f"{prefix}/error.log"])
        _wait(lambda: _healthy(f"http://{host}:{port}/healthz"), "nginx", [proxy])
        print(
            f"\nServing http://{host}:{port}/ through nginx -> daphne on {', '.join(upstreams)}"
            f"\nchannel layer {env['REDIS_URL']}; nginx config and logs in {prefix}"
            "\nCtrl-C stops everything.\n",
            flush=True,
        )
        while True:
            for name, process in started:
                if process.poll() is not None:
                    raise SystemExit(f"{name} exited with {process.returncode}")
            time.sleep(1)  # only watching for a dead child; signals interrupt it at once
    except Stop as stop:
        print(f"\n{stop}: stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        daphne_first = sorted(started, key=lambda item: not item[0].startswith("daphne"))
        for name, process in daphne_first:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {process.pid}) ignored SIGTERM; killing", flush=True)
                process.kill()
                process.wait(STOP_TIMEOUT)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
