"""The demo's room page in real headless Chromium, against real daphne processes and Redis.

Chromium is the Debian package (`make system-deps` installs it), driven by Playwright from
pip with ``executable_path``: no browser is ever downloaded. alice and bob log in through the
login form and chat in ``lobby``; the tests check presence and the status indicator, that
hostile text renders as text, that the page falls back to SSE and long-polling when the
browser lacks WebSocket (and EventSource), and that a server restart loses nothing and shows
nothing twice. A screenshot of the chat is saved under test-artifacts/ (gitignored).

Waits go through Playwright's own deadline-bounded waits (``wait_for_function``, ``expect``),
never fixed sleeps.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api as playwright_sync  # requirements-dev.txt; never skipped

from tests import servers
from tests.servers import DaphneServer, Process

pytestmark = pytest.mark.integration


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = servers.REPO_ROOT / "test-artifacts"
WAIT_MS = 30_000  # any expected change on a page (generous: CI machines can be loaded)
RECONNECT_MS = 45_000  # a page noticing a restarted server (backoff caps at 30 s)
CSRF = "browsertestcsrftoken0123456789ab"
XSS = "<img src=x onerror=window.__xss=1> and <script>window.__xss=2</script> done"


# -- servers -------------------------------------------------------------------------------


def _answers(port: int) -> bool:
    try:
        status, _ = servers.http_get(f"http://{servers.LOOPBACK}:{port}/healthz", timeout=2.0)
    except OSError:
        return False
    return status == 200


def start_daphne(env: dict[str, str], logdir: Path, label: str, port: int) -> DaphneServer:
    """A daphne process on ``port`` (which may have just been freed by a stopped one)."""
    daphne = str(servers.VENV_BIN / "daphne")
    process = servers.start_process(
        f"daphne-{label}:{port}",
        [daphne, "-b", servers.LOOPBACK, "-p", str(port), "project.asgi:application"],
        logdir / f"daphne-{label}-{port}-{time.monotonic_ns()}.log",
        cwd=servers.REPO_ROOT,
        env=env,
    )
    try:
        servers.wait_until(lambda: _answers(port), process.name, alive=process.assert_alive)
    except BaseException:
        process.stop()
        raise
    return DaphneServer(process=process, port=port)


class Site:
    """Redis, a seeded database and two daphne processes (A serves the pages, B the rest)."""

    def __init__(self, workdir: Path, redis: servers.RedisServer) -> None:
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.env = servers.django_env(workdir / "db.sqlite3", redis.url)
        servers.prepare_database(self.env)
        self.old: list[Process] = []
        self.a = self._start_anywhere("A")
        try:
            self.b = self._start_anywhere("B")
        except BaseException:
            self.a.process.stop()
            raise

    def _start_anywhere(self, label: str, attempts: int = 3) -> DaphneServer:
        for attempt in range(attempts):
            try:
                return start_daphne(self.env, self.logdir, label, servers.free_port())
            except servers.ServerError:
                if attempt == attempts - 1:
                    raise  # not a lost port race, or lost three times
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for server in (self.a, self.b):
            server.process.stop()

    def logs(self) -> dict[str, str]:
        every = [*self.old, self.a.process, self.b.process]
        return {f"{p.name}#{i}": p.log() for i, p in enumerate(every)}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("realtime-browser")
    with servers.running_redis(workdir / "redis") as redis:
        running = Site(workdir, redis)
        try:
            yield running
        finally:
            running.stop()
    bad = {name: text for name, text in running.logs().items() if servers.tracebacks(text)}
    for name, text in bad.items():
        print(f"===== {name} =====\n{text}")
    assert not bad, f"Traceback in {sorted(bad)}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs the chromium package")
    with playwright_sync.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def pages(browser: Any) -> Iterator[Any]:
    """open(user, server, without=()) -> a logged-in page on /rooms/lobby/; all closed after."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_page(
        user: str, server: DaphneServer, without: tuple[str, ...] = (), init_script: str = ""
    ) -> Any:
        context = browser.new_context(viewport={"width": 1000, "height": 760})
        contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        for name in without:
            # Before any page script runs: as if this browser had no such API at all.
            context.add_init_script(f"delete window.{name}; window.{name} = undefined;")
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda exc: errors.append(f"{user}: {exc}"))
        page.on("dialog", lambda dialog: errors.append(f"{user}: dialog {dialog.message}"))
        page.goto(f"{server.base_url}/accounts/login/?next=/rooms/lobby/")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", servers.DEMO_PASSWORD)
        page.click("button[type=submit], input[type=submit]")
        page.wait_for_url("**/rooms/lobby/")
        wait_live(page)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert errors == []


# -- page helpers --------------------------------------------------------------------------


def wait_live(page: Any, timeout: int = WAIT_MS) -> None:
    page.wait_for_function(
        "document.getElementById('status').dataset.state === 'live'", timeout=timeout
    )


def transport(page: Any) -> str:
    return page.eval_on_selector("#status", "el => el.dataset.transport")


def say(page: Any, text: str) -> None:
    page.fill("#message-input", text)
    page.click("#send-button")
    page.wait_for_function("document.getElementById('message-input').value === ''")


def texts(page: Any) -> list[str]:
    return page.eval_on_selector_all("#messages li .text", "els => els.map(e => e.textContent)")


def seqs(page: Any) -> list[int]:
    return page.eval_on_selector_all("#messages li", "els => els.map(e => Number(e.dataset.seq))")


def wait_text(page: Any, text: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function(
        "(t) => Array.from(document.querySelectorAll('#messages li .text'))"
        ".some(e => e.textContent === t)",
        arg=text,
        timeout=timeout,
    )


def wait_presence(page: Any, name: str, present: bool) -> None:
    page.wait_for_function(
        "([n, p]) => document.getElementById('presence').textContent"
        ".replace('Here: ', '').split(', ').includes(n) === p",
        arg=[name, present],
    )


def assert_once_in_order(page: Any) -> None:
    shown = seqs(page)
    assert shown == sorted(set(shown)), f"duplicates or disorder: {shown}"
    assert shown == list(range(shown[0], shown[0] + len(shown))), f"a gap: {shown}"


def api_post(server: DaphneServer, cookie: str, room: str, text: str) -> dict[str, Any]:
    """Send a message through the HTTP API of ``server`` (not through any page)."""
    request = urllib.request.Request(
        f"{server.base_url}/realtime/api/rooms/{room}/messages",
        data=json.dumps({"payload": {"text": text}}).encode(),
        headers={
            "Content-Type": "application/json",
            "X-CSRFToken": CSRF,
            "Cookie": f"{cookie}; csrftoken={CSRF}",
        },
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        assert response.status == 201
        return json.loads(response.read())


# -- the tests -----------------------------------------------------------------------------


def test_alice_and_bob_chat_with_presence_status_and_safe_rendering(site, pages):
    alice = pages("alice", site.a)
    bob = pages("bob", site.b)
    for page in (alice, bob):
        assert transport(page) == "websocket"
        assert page.text_content("#status") == "live"
    wait_presence(alice, "bob", True)
    wait_presence(bob, "alice", True)

    say(alice, "hello bob")
    wait_text(bob, "hello bob")
    say(bob, "hi alice")
    wait_text(alice, "hi alice")
    # Rendered exactly once, with the sender, own messages marked.
    for page in (alice, bob):
        assert texts(page).count("hello bob") == 1 and texts(page).count("hi alice") == 1
        assert_once_in_order(page)
    assert alice.eval_on_selector("#messages li:last-child", "li => li.className") == ""
    assert bob.eval_on_selector("#messages li:last-child", "li => li.className") == "mine"

    # Hostile text is text: no element is created and nothing runs, live or re-rendered.
    say(alice, XSS)
    wait_text(bob, XSS)
    bob.reload()
    wait_live(bob)
    wait_text(bob, XSS)
    for page in (alice, bob):
        assert page.evaluate("window.__xss") is None
        assert page.query_selector("#messages img, #messages script") is None
        assert texts(page).count(XSS) == 1

    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    assert (ARTIFACTS / "chat.png").stat().st_size > 10_000

    bob.context.close()
    wait_presence(alice, "bob", False)


@pytest.mark.parametrize(
    ("without", "expected"),
    [(("WebSocket",), "sse"), (("WebSocket", "EventSource"), "longpoll")],
    ids=["sse", "longpoll"],
)
def test_chat_works_without_websocket_over_the_fallbacks(site, pages, without, expected):
    alice = pages("alice", site.a, without=without)
    bob = pages("bob", site.b)
    assert transport(alice) == expected
    assert alice.evaluate("typeof window.WebSocket") == "undefined"

    say(alice, f"alice over {expected}")
    wait_text(bob, f"alice over {expected}")
    wait_text(alice, f"alice over {expected}")
    say(bob, f"bob to {expected}")
    wait_text(alice, f"bob to {expected}")
    for page in (alice, bob):
        assert texts(page).count(f"alice over {expected}") == 1
        assert texts(page).count(f"bob to {expected}") == 1
        assert_once_in_order(page)
    # Older history over HTTP works too, and the rendered page resumes without duplicates.
    alice.reload()
    wait_live(alice)
    assert texts(alice).count(f"bob to {expected}") == 1


@pytest.mark.parametrize(
    "without",
    [(), ("WebSocket",), ("WebSocket", "EventSource")],
    ids=["websocket", "sse", "longpoll"],
)
def test_server_restart_reconnects_and_shows_missed_messages_once(site, pages, without):
    alice = pages("alice", site.a, without=without)
    bob_cookie = servers.login(site.b, "bob")
    label = transport(alice)
    before = f"before the restart ({label})"
    api_post(site.b, bob_cookie, "lobby", before)
    wait_text(alice, before)

    port = site.a.port
    assert site.a.process.terminate() == 0  # SIGTERM: drains alice's connection
    site.old.append(site.a.process)
    alice.wait_for_function(
        "document.getElementById('status').dataset.state !== 'live'", timeout=WAIT_MS
    )
    missed = [f"while A was down {n} ({label})" for n in range(3)]
    for text in missed:
        api_post(site.b, bob_cookie, "lobby", text)  # through the other process
    site.a = start_daphne(site.env, site.logdir, "A", port)
    back = time.monotonic()

    wait_live(alice, timeout=RECONNECT_MS)
    for text in missed:
        wait_text(alice, text, timeout=WAIT_MS)
    print(f"restart over {label}: caught up {time.monotonic() - back:.2f} s after A was back")
    shown = texts(alice)
    assert [shown.count(text) for text in [before, *missed]] == [1, 1, 1, 1]
    assert transport(alice) == label
    assert_once_in_order(alice)


# A WebSocket that cannot connect (as behind a proxy that drops upgrades) until the page
# sets window.__wsAllowed: its connections go to a port nobody listens on.
FAILING_WEBSOCKET = """
(() => {
  const Real = window.WebSocket;
  window.__wsAllowed = false;
  function Gated(url, protocols) {
    const target = window.__wsAllowed ? url : url.replace(/\\/\\/[^/]+/, "//127.0.0.1:9");
    return new Real(target, protocols);
  }
  Gated.prototype = Real.prototype;
  window.WebSocket = Gated;
})();
"""

CLIENT_SCRIPT = """
async (upgradeMs) => {
  const log = (window.__log = {messages: [], states: [], transports: []});
  const client = (window.__client = new Realtime.Client({upgradeInterval: upgradeMs}));
  client.on("state", (s) => log.states.push(s));
  client.on("transport", (t) => log.transports.push(t));
  client.join("lobby", {onMessage: (m) => log.messages.push(m.seq)});
  client.connect();
}
"""


def test_client_falls_back_when_websocket_fails_and_upgrades_later(site, pages):
    page = pages("alice", site.a, init_script=FAILING_WEBSOCKET)
    # The page's own client already fell back; now drive the client API directly.
    assert transport(page) == "sse"
    page.evaluate(CLIENT_SCRIPT, 500)
    page.wait_for_function("window.__client.state === 'live'")
    assert page.evaluate("window.__log.transports") == ["websocket", "sse"]
    bob_cookie = servers.login(site.b, "bob")
    first = api_post(site.b, bob_cookie, "lobby", "over sse")["seq"]
    page.wait_for_function("(s) => window.__log.messages.includes(s)", arg=first)

    page.evaluate("window.__wsAllowed = true")
    page.wait_for_function("window.__client.transport === 'websocket'")
    page.wait_for_function("window.__client.state === 'live'")
    second = api_post(site.b, bob_cookie, "lobby", "over websocket")["seq"]
    page.wait_for_function("(s) => window.__log.messages.includes(s)", arg=second)
    sent = page.evaluate("window.__client.send('lobby', {text: 'from the api'})")
    page.wait_for_function("(s) => window.__log.messages.includes(s)", arg=sent["seq"])
    received = page.evaluate("window.__log.messages")
    assert received == list(range(received[0], sent["seq"] + 1)), received
    assert received[0] <= first and sent["seq"] == second + 1


ROOMS_SCRIPT = """
async (kind) => {
  const log = (window.__rooms = {lobby: [], team: [], acks: []});
  const client = (window.__c = new Realtime.Client({transports: [kind]}));
  const handlers = (room) => ({
    onMessage: (m) => log[room].push(m.seq),
    onJoin: (a) => log.acks.push(a.room),
  });
  client.join("lobby", handlers("lobby"));
  client.connect();
  // Joined while the first connection is still on its way: it must follow both rooms.
  client.join("team", handlers("team"));
}
"""


@pytest.mark.parametrize("kind", ["websocket", "sse", "longpoll"])
def test_client_follows_rooms_joined_and_left_while_connected(site, pages, kind):
    page = pages("alice", site.a)
    page.evaluate(ROOMS_SCRIPT, kind)
    page.wait_for_function(
        "(k) => window.__c.state === 'live' && window.__c.transport === k", arg=kind
    )
    page.wait_for_function(
        "window.__rooms.acks.includes('lobby') && window.__rooms.acks.includes('team')"
    )
    bob_cookie = servers.login(site.b, "bob")
    team = api_post(site.b, bob_cookie, "team", f"team over {kind}")["seq"]
    lobby = api_post(site.b, bob_cookie, "lobby", f"lobby over {kind}")["seq"]
    page.wait_for_function(
        "([t, l]) => window.__rooms.team.includes(t) && window.__rooms.lobby.includes(l)",
        arg=[team, lobby],
    )

    page.evaluate("window.__c.leave('lobby')")
    page.wait_for_function("window.__c.state === 'live'")
    after = api_post(site.b, bob_cookie, "team", "team again")["seq"]
    ignored = api_post(site.b, bob_cookie, "lobby", "lobby after leaving")["seq"]
    page.wait_for_function("(t) => window.__rooms.team.includes(t)", arg=after)
    # Had the left room still been followed, its message would have come before this one.
    last = api_post(site.b, bob_cookie, "team", "team last")["seq"]
    page.wait_for_function("(t) => window.__rooms.team.includes(t)", arg=last)
    log = page.evaluate("window.__rooms")
    assert log["lobby"] == [lobby] and ignored not in log["lobby"], log
    assert log["team"] == [team, after, last], log
