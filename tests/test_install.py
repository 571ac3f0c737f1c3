"""Drop-in installation: the wheel, and docs/installation.md applied to a brand-new project.

The wheel is built from a clean copy of the sources and installed, with its dependencies
from the package index, into a fresh virtualenv. ``django-admin startproject mysite`` makes a
host project that already has a view of its own and a login page; then every code block of
docs/installation.md is applied to it, in order (a block this file does not know how to apply
fails the test, so the guide cannot grow a step the test skips). The project is checked,
migrated and served by daphne on a free loopback port; a user logs in over HTTP, joins a room
over a real WebSocket, sends a message and receives it, and the host's own view still answers.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
import types
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from realtime import checks
from tests.servers import (
    LOOPBACK,
    free_port,
    http_get,
    login,
    running_redis,
    start_process,
    tracebacks,
    wait_until,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DIST = PYPROJECT["name"]
GUIDE = ROOT / "docs" / "installation.md"
COMMAND_TIMEOUT = 300.0  # pip may download; generous on a loaded machine
FRAME_TIMEOUT = 15.0
PASSWORD = "install-test-pw-1"


def run(argv, cwd, env, timeout=COMMAND_TIMEOUT):
    """Run ``argv``; its stdout+stderr; fails the test with the output if it fails."""
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (
        f"{shlex.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}"
    )
    return done.stdout


# -- the wheel -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the build writes build/ and egg-info)."""
    workdir = tmp_path_factory.mktemp("wheel")
    source = workdir / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "realtime",
        source / "realtime",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = workdir / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, source],
        workdir,
        None,
    )
    (built,) = out.glob("*.whl")
    return built


def package_files():
    """Every file of the realtime package in this checkout, as the wheel names them."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "realtime").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_wheel_holds_the_app_with_its_data_files_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    app = {n for n in names if not n.startswith(f"{DIST.replace('-', '_')}-")}
    assert app == package_files()
    for required in (
        "realtime/py.typed",
        "realtime/static/realtime/realtime.js",
        "realtime/migrations/0001_initial.py",
        "realtime/templatetags/realtime.py",
        "realtime/testing.py",
    ):
        assert required in app, required
    assert not [n for n in names if n.split("/")[0] in {"project", "tests", "templates", "deploy"}]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_wheel_metadata_matches_pyproject(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    fields = [line.split(": ", 1) for line in text.split("\n\n", 1)[0].splitlines() if ": " in line]
    assert ["Name", DIST] in fields and ["Version", PYPROJECT["version"]] in fields
    assert ["Requires-Python", ">=3.11"] in fields and ["License-Expression", "MIT"] in fields
    requires = sorted(value.replace(" ", "") for key, value in fields if key == "Requires-Dist")
    normal = sorted(re.sub(r"([<>=!~]=?[^,]*),?", "", d) for d in requires)
    assert normal == sorted(re.sub(r"[<>=!~].*", "", d) for d in PYPROJECT["dependencies"])
    for dependency in requires:
        assert re.search(r">=\d", dependency), f"{dependency} has no lower bound"


def _imported_top_level_modules():
    modules = set()
    for path in (ROOT / "realtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dependencies_cover_every_third_party_import():
    """A module realtime imports comes from the standard library, realtime, or a dependency."""
    declared = {_canonical(re.split(r"[<>=!~\[; ]", d)[0]) for d in PYPROJECT["dependencies"]}
    distributions = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        if module in sys.stdlib_module_names or module in {"realtime", "__future__"}:
            continue
        provided_by = {_canonical(d) for d in distributions.get(module, [module])}
        if not provided_by & declared:
            missing[module] = sorted(provided_by)
    assert missing == {}, f"imported but not in pyproject dependencies: {missing}"


# -- a fresh host project ------------------------------------------------------------------

HOST_VIEWS = '''\
from django.http import HttpResponse


def home(request):
    """The host project's own page: it names the logged-in user."""
    who = request.user.get_username() if request.user.is_authenticated else "anonymous"
    return HttpResponse(f"host home for {who}")
'''

HOST_LOGIN_TEMPLATE = (
    '<form method="post">{% csrf_token %}{{ form }}<button>Log in</button></form>\n'
)

# What the host project had before realtime: a page of its own and a login page.
HOST_SETTINGS = """
TEMPLATES[0]["DIRS"] = [BASE_DIR / "templates"]
LOGIN_REDIRECT_URL = "/"
"""

HOST_URLS = """
from django.contrib.auth.views import LoginView

from mysite import views

urlpatterns += [
    path("", views.home),
    path("accounts/login/", LoginView.as_view(template_name="login.html")),
]
"""

# Alternative ASGI wirings, for the checks that look at ASGI_APPLICATION.
BROKEN_ASGI = """
from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator

from mysite.asgi import django_asgi_app
from realtime.routing import websocket_urlpatterns

http_only = django_asgi_app
no_origin_check = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns))}
)
no_auth = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
    }
)
"""

# Each misconfiguration the checks document, applied with override_settings in one process.
MISCONFIGURATIONS = r"""
import copy, json
from django.conf import settings
from django.core.checks import run_checks
from django.test.utils import override_settings

apps = list(settings.INSTALLED_APPS)
memory = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
redis_host = {"address": "redis://127.0.0.1:1/0"}  # no socket_timeout
no_timeout = {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis_host]}}
plain_sqlite = copy.deepcopy(settings.DATABASES)
plain_sqlite["default"]["OPTIONS"] = {}
cases = {
    "E001": {"INSTALLED_APPS": [a for a in apps if a != "channels"]},
    "E002": {"CHANNEL_LAYERS": {}},
    "E003": {"REALTIME_HEARTBEAT": "25"},
    "E004": {"ASGI_APPLICATION": None},
    "E005": {"ASGI_APPLICATION": "mysite.nowhere.application"},
    "E006": {"ASGI_APPLICATION": "mysite.broken_asgi.http_only"},
    "W001": {"DEBUG": False, "CHANNEL_LAYERS": memory},
    "W002": {"CHANNEL_LAYERS": {"default": no_timeout}},
    "W003": {"DATABASES": plain_sqlite},
    "W004": {"INSTALLED_APPS": [a for a in apps if a != "daphne"]},
    "W005": {"ASGI_APPLICATION": "mysite.broken_asgi.no_origin_check"},
    "W006": {"ASGI_APPLICATION": "mysite.broken_asgi.no_auth"},
    "W007": {"REALTIME_HEARTBEET": 10},
}
found = {}
for name, overrides in cases.items():
    with override_settings(**overrides):
        found[name] = sorted({m.id for m in run_checks() if m.id.startswith("realtime.")})
print("RESULT " + json.dumps(found))
"""


@dataclass
class Guide:
    """The code blocks of docs/installation.md, sorted by what the test does with them."""

    pip_install: list[str] = field(default_factory=list)
    edits: list[tuple[str, str, str]] = field(default_factory=list)  # (path, action, code)
    commands: list[list[str]] = field(default_factory=list)
    serve: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)


def read_guide() -> Guide:
    """Parse every fenced block of the installation steps; fail on one the test cannot apply."""
    text = GUIDE.read_text()
    steps = text.split("\n## ", 1)[0]  # the numbered steps come before the first section
    guide = Guide()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", steps, re.M | re.S)
    assert blocks, "no code blocks in docs/installation.md"
    for language, code in blocks:
        if language == "python":
            header = re.match(r"# (\S+): (add at the end|the whole file)\b", code)
            assert header, (
                f"python block without a '# path: add at the end|the whole file' line:\n{code}"
            )
            guide.edits.append((header[1], header[2], code))
            guide.order.append(f"edit {header[1]}")
            continue
        assert language == "sh", f"unexpected ```{language} block:\n{code}"
        for line in code.strip().splitlines():
            argv = shlex.split(line)
            if argv[:2] == ["pip", "install"]:
                assert argv[2:] == [DIST], f"install command names {argv[2:]}, not {DIST}"
                guide.pip_install = argv
            elif argv[:2] == ["python", "manage.py"]:
                guide.commands.append(argv)
            elif argv[0] == "daphne":
                guide.serve = argv
            else:
                pytest.fail(f"installation.md step the test cannot run: {line}")
            guide.order.append(argv[0] if argv[0] != "python" else " ".join(argv[:3]))
    assert guide.pip_install and guide.serve and guide.commands, guide.order
    assert guide.order[0] == "pip" and guide.order[-1] == "daphne", guide.order
    return guide


@dataclass
class Host:
    directory: Path
    bin: Path
    env: dict[str, str]
    guide: Guide
    outputs: dict[str, str]

    def manage(self, *args: str) -> str:
        return run([self.bin / "python", "manage.py", *args], self.directory, self.env)

    def shell(self, code: str) -> str:
        return self.manage("shell", "-c", textwrap.dedent(code))


def _clean_env(bin_dir: Path, redis_url: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "REALTIME_", "PYTHON"))
        and key not in {"VIRTUAL_ENV", "REDIS_URL", "DATABASE_URL", "DEBUG", "ALLOWED_HOSTS"}
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(bin_dir.parent),
        REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("install-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def host(wheel, redis, tmp_path_factory) -> Host:
    """A fresh venv and startproject, with every step of docs/installation.md applied."""
    guide = read_guide()
    workdir = tmp_path_factory.mktemp("install")
    venv = workdir / "venv"
    run([sys.executable, "-m", "venv", venv], workdir, None)
    bin_dir = venv / "bin"
    env = _clean_env(bin_dir, redis.url)

    # Step 1, with the wheel in place of the published distribution.
    run([bin_dir / "pip", "install", "--quiet", wheel], workdir, env)
    located = run(
        [bin_dir / "python", "-c", "import realtime; print(realtime.__file__)"], workdir, env
    )
    assert str(venv) in located, f"realtime imported from {located}, not the fresh venv"

    # The existing project: startproject plus a page and a login page of its own.
    run([bin_dir / "django-admin", "startproject", "mysite"], workdir, env)
    project = workdir / "mysite"
    (project / "mysite" / "views.py").write_text(HOST_VIEWS)
    (project / "templates").mkdir()
    (project / "templates" / "login.html").write_text(HOST_LOGIN_TEMPLATE)
    with (project / "mysite" / "settings.py").open("a") as fh:
        fh.write(HOST_SETTINGS)
    with (project / "mysite" / "urls.py").open("a") as fh:
        fh.write(HOST_URLS)

    # Steps 2-4: the code blocks, each into the file it names.
    for path, action, code in guide.edits:
        target = project / path
        assert target.is_file(), f"installation.md edits {path}, which startproject did not make"
        if action == "the whole file":
            target.write_text(code)
        else:
            with target.open("a") as fh:
                fh.write("\n" + code)

    # Step 5: its commands, as written, with the venv's python.
    outputs = {}
    host = Host(project, bin_dir, env, guide, outputs)
    for argv in guide.commands:
        outputs[" ".join(argv[2:])] = run([bin_dir / "python", *argv[1:]], project, env)
    return host


def realtime_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "realtime." in line]


async def test_guide_installs_into_a_fresh_project_that_then_serves_rooms(host, tmp_path):
    # Step 5 ran migrate and check: no realtime message, also with --deploy's checks.
    assert "check" in host.outputs and "migrate" in host.outputs, host.guide.order
    assert realtime_lines(host.outputs["check"]) == []
    assert realtime_lines(host.manage("check", "--deploy")) == []
    assert "realtime/realtime.js" in host.manage("findstatic", "realtime/realtime.js")

    host.shell(
        f"""
        from django.contrib.auth import get_user_model
        from realtime.models import Room
        get_user_model().objects.create_user("alice", password="{PASSWORD}")
        Room.objects.create(slug="lobby", title="Lobby")
        """
    )

    # Step 6: daphne as the guide says, on a free port instead of 8000.
    argv = list(host.guide.serve)
    assert argv[argv.index("-p") + 1] == "8000" and argv[argv.index("-b") + 1] == LOOPBACK
    port = free_port()
    argv[argv.index("-p") + 1] = str(port)
    daphne = start_process(
        f"daphne-install:{port}",
        [str(host.bin / argv[0]), *argv[1:]],
        tmp_path / "daphne.log",
        cwd=host.directory,
        env=host.env,
    )
    base = f"http://{LOOPBACK}:{port}"
    try:

        def answers():
            try:
                return http_get(base + "/", timeout=2.0)[0] == 200
            except OSError:
                return False

        wait_until(answers, daphne.name, timeout=60, alive=daphne.assert_alive)
        assert http_get(base + "/") == (200, "host home for anonymous")

        cookie = login(types.SimpleNamespace(base_url=base), "alice", PASSWORD)
        status, rooms = _get(base + "/realtime/api/rooms/", cookie)
        assert status == 200 and [r["room"] for r in json.loads(rooms)["rooms"]] == ["lobby"]

        async with connect(
            f"ws://{LOOPBACK}:{port}/ws/",
            additional_headers={"Origin": base, "Cookie": cookie},
            proxy=None,
            open_timeout=FRAME_TIMEOUT,
        ) as ws:
            hello = await _recv(ws)
            assert hello["type"] == "hello" and hello["user"]["name"] == "alice", hello
            await ws.send(json.dumps({"type": "join", "room": "lobby", "ref": "j"}))
            ack = await _recv_until(ws, lambda f: f.get("ref") == "j")
            assert ack["type"] == "ack" and ack["seq"] == 0, ack
            text = {"text": "hello from a fresh project"}
            await ws.send(
                json.dumps({"type": "send", "room": "lobby", "ref": "s", "payload": text})
            )
            sent = await _recv_until(ws, lambda f: f.get("ref") == "s")
            assert sent["type"] == "ack" and sent["seq"] == 1, sent
            message = await _recv_until(ws, lambda f: f["type"] == "message")
            assert message["seq"] == 1 and message["payload"] == text
            assert message["sender"]["name"] == "alice"

        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"ws://{LOOPBACK}:{port}/ws/",
                additional_headers={"Origin": "http://evil.example", "Cookie": cookie},
                proxy=None,
                open_timeout=FRAME_TIMEOUT,
            ):
                pass
        assert refused.value.response.status_code == 403

        # The host's own view still answers, and sees the login.
        assert _get(base + "/", cookie) == (200, "host home for alice")
    finally:
        daphne.stop()
    assert tracebacks(daphne.log()) == [], daphne.log()


def test_each_documented_misconfiguration_produces_its_check_id(host):
    (host.directory / "mysite" / "broken_asgi.py").write_text(BROKEN_ASGI)
    output = host.manage("shell", "-c", MISCONFIGURATIONS)
    (line,) = [line for line in output.splitlines() if line.startswith("RESULT ")]
    found = json.loads(line.removeprefix("RESULT "))
    assert {f"realtime.{name}" for name in found} == set(checks.CHECK_IDS)
    for name, ids in found.items():
        assert ids == [f"realtime.{name}"], (name, ids)


# -- helpers -------------------------------------------------------------------------------


def _get(url: str, cookie: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Cookie": cookie})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=FRAME_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _recv(ws) -> dict:
    import asyncio

    async with asyncio.timeout(FRAME_TIMEOUT):
        data = await ws.recv()
    assert isinstance(data, str), data
    return json.loads(data)


async def _recv_until(ws, predicate, limit: int = 100) -> dict:
    for _ in range(limit):
        frame = await _recv(ws)
        if predicate(frame):
            return frame
        assert frame["type"] != "error", frame
    raise AssertionError(f"no matching frame in {limit} frames")
