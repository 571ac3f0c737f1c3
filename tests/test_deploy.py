"""The files in deploy/: they render, nginx accepts them, and `make serve` runs them."""

from __future__ import annotations

import configparser
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from websockets.sync.client import connect

from realtime.drain import DRAIN_TIMEOUT
from tests import servers

ROOT = servers.REPO_ROOT
render = servers.render


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [servers.find_nginx(), "-t", "-p", str(conf.parent), "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_rendered_local_config_passes_nginx_t(tmp_path):
    conf = render.write_local_nginx(
        tmp_path, ["127.0.0.1:8001", "127.0.0.1:8002"], "127.0.0.1:8000", str(tmp_path)
    )
    done = nginx_test(conf)
    assert done.returncode == 0, done.stderr
    site = (tmp_path / "realtime.conf").read_text()
    assert "{{" not in site
    assert site.count("server 127.0.0.1:800") == 2


def test_production_site_with_tls_passes_nginx_t(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=chat.example.com", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    site = tmp_path / "realtime.conf"
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "render.py"), "nginx",
         "--upstream", "127.0.0.1:8001", "--upstream", "127.0.0.1:8002",
         "--server-name", "chat.example.com", "--static-root", "/srv/realtime/staticfiles",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    site.write_text(done.stdout)
    assert "listen 443 ssl;" in done.stdout and "return 301 https://" in done.stdout
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (tmp_path / sub).mkdir(parents=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(render.nginx_local(tmp_path, site))
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr


def test_site_has_websocket_sse_and_forwarding_rules():
    site = render.nginx_site(["127.0.0.1:8001"], "/srv/static")
    assert "proxy_set_header Upgrade $http_upgrade;" in site
    assert "proxy_set_header Connection $realtime_connection;" in site
    # daphne --proxy-headers trusts the first X-Forwarded-For address: it must be nginx's.
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in site
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in site
    sse = site[site.index("location /realtime/sse/") :]
    sse = sse[: sse.index("}")]
    assert "proxy_buffering off;" in sse and "proxy_read_timeout 3600s;" in sse
    ws = site[site.index("location = /ws/") :]
    assert "proxy_read_timeout 3600s;" in ws[: ws.index("}")]


def test_render_refuses_missing_or_unknown_fields():
    with pytest.raises(render.RenderError):
        render.render("{{a}} {{b}}", {"a": "1"})
    with pytest.raises(render.RenderError):
        render.render("{{a}}", {"a": "1", "c": "2"})
    with pytest.raises(render.RenderError):
        render.nginx_site([], "/srv/static")


def test_render_cli_reports_bad_arguments_without_a_traceback():
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "render.py"), "nginx", "--upstream", "x:1",
         "--static-root", "/s", "--tls-cert", "/only-a-cert.pem"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--tls-key" in done.stderr


def test_systemd_unit_runs_daphne_with_proxy_headers_and_outlasts_the_drain():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(render.DAPHNE_UNIT)
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > DRAIN_TIMEOUT
    assert service["EnvironmentFile"] == "/etc/realtime/realtime.env"
    argv = render.daphne_argv(8001, "daphne")
    assert argv == [
        "daphne", "--proxy-headers", "-b", "127.0.0.1", "-p", "8001", "project.asgi:application"
    ]  # fmt: skip


def test_systemd_files_pass_systemd_analyze_where_available(tmp_path):
    analyze = "/usr/bin/systemd-analyze"
    if not os.access(analyze, os.X_OK):
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(
        [analyze, "verify", "--man=no", "--recursive-errors=no",
         str(render.DAPHNE_UNIT.parent / "realtime.target")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # Only syntax counts here: the paths of a production host do not exist on this machine.
    syntax = [
        line
        for line in done.stderr.splitlines()
        if "Unknown key" in line or "Unknown section" in line or "bad-setting" in line
    ]
    assert syntax == [], done.stderr


def test_environment_example_lists_every_variable_the_readme_documents():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Environment variables of the demo project") :]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.M))
    example = (ROOT / "deploy" / "realtime.env.example").read_text()
    assigned = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert documented and documented == assigned


@pytest.mark.integration
def test_make_serve_runs_the_topology_and_stops_it_all_on_ctrl_c(tmp_path):
    port = next(p for p in (servers.free_port() for _ in range(50)) if _ports_free(p, 3))
    daphne_ports = [port + 1, port + 2]
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG"}}
    env.update(
        PORT=str(port),
        DAPHNES="2",
        DATABASE_URL=f"sqlite:///{tmp_path / 'serve.sqlite3'}",
        DJANGO_SETTINGS_MODULE="project.settings",
    )
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        ["make", "--no-print-directory", "serve"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C goes to the whole foreground group: so do we
    )
    try:
        base = f"http://127.0.0.1:{port}"
        servers.wait_until(
            lambda: servers._healthy(base), "make serve", timeout=120, alive=lambda: None
        )
        status, body = servers.http_json(f"{base}/healthz")
        assert status == 200, body
        js_status, _ = servers.http_get(f"{base}/static/realtime/realtime.js")
        assert js_status == 200  # collected static files served by nginx
        cookie = servers.login(types.SimpleNamespace(base_url=base), "alice")
        with connect(
            f"ws://127.0.0.1:{port}/ws/",
            additional_headers={"Origin": base, "Cookie": cookie},
            proxy=None,
            open_timeout=10,
        ) as ws:
            assert '"name":"alice"' in ws.recv(timeout=10)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) in {0, 2, -signal.SIGINT}  # make passes the interrupt on
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert "Serving http://127.0.0.1:" in output, output
    # Nothing listens any more: nothing was left running.
    deadline = time.monotonic() + 10
    for p in [port, *daphne_ports]:
        servers.wait_until(
            lambda p=p: not _listening(p), f"port {p} closed", max(0.1, deadline - time.monotonic())
        )


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports_free(first: int, count: int) -> bool:
    return all(_port_free(first + i) for i in range(count))
