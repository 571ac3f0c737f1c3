"""Security units (realtime/auth.py and the limits in session.py): Origin, tickets, live
re-checks of authorisation, rate limits, connection caps, CSRF, log redaction, backpressure.

The attacks against real daphne processes are in tests/test_attacks.py.
"""

import functools
import io
import json
import logging

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client as HttpClient
from django.test import override_settings
from django.urls import URLPattern, URLResolver, reverse

from realtime import auth, backpressure, ratelimit, session
from realtime.models import Message
from realtime.protocol import MAX_PAYLOAD_KEYS, FrameError, parse

from .wsclient import TIMEOUT

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub")]

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
HOST = (b"host", b"127.0.0.1:8000")


@pytest.fixture(autouse=True)
def fresh_limits():
    """Rate-limit state is per process: start every test from none."""
    ratelimit._memory._tat.clear()
    yield
    ratelimit._memory._tat.clear()


def scope(host="example.com", **headers):
    pairs = [(b"host", host.encode())]
    pairs += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "websocket", "headers": pairs}


# -- Origin ----------------------------------------------------------------------------------


@override_settings(ALLOWED_HOSTS=["example.com", ".example.org"], REALTIME_ALLOWED_ORIGINS=None)
@pytest.mark.parametrize(
    ("host", "origin", "forwarded", "allowed"),
    [
        ("example.com", "http://example.com", None, True),
        ("example.com", "http://EXAMPLE.com/", None, True),
        ("example.com", "https://example.com", None, False),  # scheme differs
        ("example.com", "http://example.com:8080", None, False),  # port differs
        ("example.com:8080", "http://example.com:8080", None, True),
        ("example.com:8080", "http://example.com", None, False),
        ("example.com", "http://evil.example", None, False),  # host not allowed
        ("example.com", "http://example.com.evil.example", None, False),
        ("a.example.org", "http://a.example.org", None, True),  # subdomain pattern
        ("example.com", "https://example.com", "https", True),  # TLS ended at the proxy
        ("example.com", "http://example.com", "https", False),  # insecure page, TLS socket
        ("example.com", None, None, False),  # no Origin at all
        ("example.com", "null", None, False),  # sandboxed iframes, file: pages
        ("example.com", "http://user@example.com", None, False),
        ("example.com", "ftp://example.com", None, False),
        ("example.com", "http://[::1", None, False),  # unparsable
    ],
)
def test_default_origin_rule_matches_scheme_host_and_port(host, origin, forwarded, allowed):
    headers = {"x_forwarded_proto": forwarded} if forwarded else {}
    assert auth.origin_allowed(scope(host, **headers), origin) is allowed


@override_settings(REALTIME_ALLOWED_ORIGINS=["https://app.example.com:8443", "http://localhost"])
@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com:8443", True),
        ("http://localhost:80", True),
        ("http://localhost", True),
        ("https://app.example.com", False),
        ("http://app.example.com:8443", False),
        ("http://localhost:8000", False),
    ],
)
def test_configured_origins_match_exactly(origin, allowed):
    assert auth.origin_allowed(scope("anything"), origin) is allowed


@override_settings(REALTIME_ALLOWED_ORIGINS=["*"])
def test_a_wildcard_allows_any_origin_but_never_a_missing_one():
    assert auth.origin_allowed(scope(), "https://anywhere.example")
    assert not auth.origin_allowed(scope(), None)


# -- the full ASGI stack ---------------------------------------------------------------------


async def full_stack(headers, subprotocols=None):
    from project.asgi import application

    comm = WebsocketCommunicator(application, "/ws/", headers=headers, subprotocols=subprotocols)
    connected, subprotocol = await comm.connect(timeout=TIMEOUT)
    return comm, connected, subprotocol


def make_session(user):
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.save()
    return store.session_key


async def cookie_of(user):
    key = await database_sync_to_async(make_session)(user)
    return key, (b"cookie", f"sessionid={key}".encode())


async def hello_of(comm):
    hello = json.loads(await comm.receive_from(timeout=TIMEOUT))
    assert hello["type"] == "hello", hello
    return hello


async def test_forged_origin_gets_403_even_with_a_valid_session_cookie(users):
    _, cookie = await cookie_of(users["alice"])
    for origin in (b"http://evil.example", b"https://127.0.0.1:8000", b"http://127.0.0.1:9999"):
        comm, connected, _ = await full_stack([cookie, (b"origin", origin), HOST])
        assert not connected, origin
    comm, connected, _ = await full_stack([cookie, ORIGIN, HOST])
    assert connected
    assert (await hello_of(comm))["user"]["name"] == "alice"
    await comm.disconnect()


# -- tickets ---------------------------------------------------------------------------------


def issue(user, session_key=None):
    return auth.issue_ticket(user, session_key)


async def connect_with_ticket(ticket, *extra_headers):
    return await full_stack(
        [ORIGIN, HOST, *extra_headers],
        subprotocols=[auth.SUBPROTOCOL, auth.TICKET_PROTOCOL_PREFIX + ticket],
    )


async def test_a_ticket_authenticates_once_and_is_never_echoed(users):
    ticket = await database_sync_to_async(issue)(users["alice"])
    comm, connected, subprotocol = await connect_with_ticket(ticket)
    assert connected and subprotocol == auth.SUBPROTOCOL
    assert (await hello_of(comm))["user"]["name"] == "alice"
    await comm.disconnect()
    # Single use: the same ticket again is refused at the handshake.
    _, connected, _ = await connect_with_ticket(ticket)
    assert not connected


async def test_forged_tickets_are_refused(users):
    ticket = await database_sync_to_async(issue)(users["alice"])
    payload, stamp, signature = ticket.split(".")
    bob_payload = auth._signer().sign_object({"u": str(users["bob"].pk), "n": "x"}).split(".")[0]
    forged = [
        f"{payload}.{stamp}.{signature[:-2]}AA",  # bad signature
        f"{bob_payload}.{stamp}.{signature}",  # another user's id under alice's signature
        "not-a-ticket",
        "x" * 2000,
        "",
    ]
    for bad in forged:
        _, connected, _ = await connect_with_ticket(bad)
        assert not connected, bad
    # None of that used the real ticket up.
    comm, connected, _ = await connect_with_ticket(ticket)
    assert connected
    await comm.disconnect()


async def test_expired_ticket_is_refused(users, monkeypatch):
    import django.core.signing

    ticket = await database_sync_to_async(issue)(users["alice"])
    real = django.core.signing.time.time
    monkeypatch.setattr(django.core.signing.time, "time", lambda: real() + 31)
    _, connected, _ = await connect_with_ticket(ticket)
    assert not connected


@override_settings(REALTIME_TICKET_TTL=5)
def test_expiry_follows_the_ticket_ttl_setting(users, monkeypatch):
    import django.core.signing

    ticket = issue(users["alice"])
    real = django.core.signing.time.time
    monkeypatch.setattr(django.core.signing.time, "time", lambda: real() + 6)
    with pytest.raises(auth.TicketError, match="expired"):
        auth.redeem_ticket(ticket)


async def test_a_ticket_for_another_user_than_the_session_is_refused(users):
    ticket = await database_sync_to_async(issue)(users["alice"])
    _, bob_cookie = await cookie_of(users["bob"])
    _, connected, _ = await connect_with_ticket(ticket, bob_cookie)
    assert not connected


async def test_a_password_change_voids_outstanding_tickets(users):
    alice = users["alice"]
    key = await database_sync_to_async(make_session)(alice)
    ticket = await database_sync_to_async(issue)(alice, key)

    def change():
        alice.set_password("a-new-password")
        alice.save()

    await database_sync_to_async(change)()
    _, connected, _ = await connect_with_ticket(ticket)
    assert not connected


def test_redeem_ticket_for_http_transports(users, rf):
    ticket = issue(users["alice"])
    request = rf.get("/realtime/sse/", {"ticket": ticket})
    from django.contrib.auth.models import AnonymousUser

    request.user = AnonymousUser()
    user, credentials = auth.authenticate_request(request)
    assert user.pk == users["alice"].pk and credentials.user_id == str(users["alice"].pk)
    with pytest.raises(auth.TicketError, match="already used"):
        auth.authenticate_request(request)
    request = rf.get("/realtime/sse/", {"ticket": issue(users["alice"])})
    request.user = users["bob"]
    with pytest.raises(auth.TicketError, match="another user"):
        auth.authenticate_request(request)


def test_ticket_endpoint_needs_login_and_csrf(users):
    client = HttpClient(enforce_csrf_checks=True)
    url = reverse("realtime:tickets")
    client.get("/accounts/login/")  # sets the csrftoken cookie
    token = client.cookies["csrftoken"].value
    anonymous = client.post(url, HTTP_X_CSRFTOKEN=token)
    assert anonymous.status_code == 401, anonymous.content
    client.force_login(users["alice"])
    without_token = client.post(url)
    assert without_token.status_code == 403 and "CSRF" in without_token.json()["error"]["message"]
    issued = client.post(url, HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    assert issued.status_code == 201, issued.content
    body = issued.json()
    assert body["expires_in"] == 30 and issued["Cache-Control"] == "no-store"
    assert body["subprotocols"] == [auth.SUBPROTOCOL, auth.TICKET_PROTOCOL_PREFIX + body["ticket"]]
    user, _ = auth.redeem_ticket(body["ticket"])
    assert user.pk == users["alice"].pk
    assert client.get(url).status_code == 405


def test_ticket_is_a_websocket_protocol_token(users):
    ticket = issue(users["alice"])
    # RFC 6455 subprotocols are RFC 7230 tokens: no separators such as ":" "," "=" "/".
    assert all(c.isalnum() or c in "-_.~!#$%&'*+^`|" for c in ticket), ticket


# -- log redaction ---------------------------------------------------------------------------


def test_redact_masks_tickets_in_urls_and_subprotocols():
    assert auth.redact("GET /realtime/sse/?room=a&ticket=abc.def-_1&x=1") == (
        "GET /realtime/sse/?room=a&ticket=[redacted]&x=1"
    )
    assert auth.redact("GET /realtime/poll/?ticket=abc") == "GET /realtime/poll/?ticket=[redacted]"
    assert auth.redact("offered realtime.v1, realtime.ticket.abc.def") == (
        "offered realtime.v1, realtime.ticket.[redacted]"
    )
    assert auth.redact("nothing to hide") == "nothing to hide"
    # Each marker alone is enough (the quick test before the expression must not skip them).
    assert auth.redact("?ticket=a") == "?ticket=[redacted]"
    assert auth.redact("realtime.ticket.a") == "realtime.ticket.[redacted]"
    assert auth.redact("ticket") == "ticket"


def test_daphne_access_log_and_logging_handlers_are_redacted():
    from daphne.access import AccessLogGenerator

    auth.install_log_redaction()
    stream = io.StringIO()
    AccessLogGenerator(stream)(
        "http",
        "complete",
        {
            "path": "/realtime/sse/?ticket=SECRET",
            "status": 200,
            "method": "GET",
            "client": "x",
            "size": 1,
        },
    )
    assert "SECRET" not in stream.getvalue() and "ticket=[redacted]" in stream.getvalue()

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(auth.TicketRedactingFilter())
    log = logging.getLogger("tests.redaction")
    log.addHandler(handler)
    try:
        log.warning("Not Found: %s", "/realtime/sse/?ticket=SECRET")
    finally:
        log.removeHandler(handler)
    assert "SECRET" not in buffer.getvalue() and "[redacted]" in buffer.getvalue()


# -- authorisation re-checked live -----------------------------------------------------------


async def closed_with(comm, code):
    for _ in range(100):
        output = await comm.receive_output(timeout=TIMEOUT)
        if output["type"] == "websocket.close":
            assert output.get("code") == code, output
            return
    raise AssertionError("no close")


@override_settings(REALTIME_AUTH_RECHECK=0.2)
async def test_logout_closes_the_connection_with_4001(users):
    key, cookie = await cookie_of(users["alice"])
    comm, connected, _ = await full_stack([cookie, ORIGIN, HOST])
    assert connected
    await hello_of(comm)
    await database_sync_to_async(SessionStore(key).delete)()  # what logout() does
    await closed_with(comm, 4001)


@override_settings(REALTIME_AUTH_RECHECK=0.2)
async def test_password_change_and_deactivation_close_with_4001(users):
    for change in ("password", "deactivate"):
        user = users["alice"] if change == "password" else users["bob"]
        _, cookie = await cookie_of(user)
        comm, connected, _ = await full_stack([cookie, ORIGIN, HOST])
        assert connected
        await hello_of(comm)

        def apply(user=user, change=change):
            if change == "password":
                user.set_password("changed-elsewhere")
            else:
                user.is_active = False
            user.save()

        await database_sync_to_async(apply)()
        await closed_with(comm, 4001)


@override_settings(REALTIME_AUTH_RECHECK=0.2)
async def test_a_ticket_connection_is_closed_when_its_session_ends(users):
    key = await database_sync_to_async(make_session)(users["alice"])
    ticket = await database_sync_to_async(issue)(users["alice"], key)
    comm, connected, _ = await connect_with_ticket(ticket)
    assert connected
    await hello_of(comm)
    await database_sync_to_async(SessionStore(key).delete)()
    await closed_with(comm, 4001)


@override_settings(REALTIME_AUTH_RECHECK=0.2)
async def test_a_lost_permission_removes_the_room_without_any_signal(users, rooms):
    from django.contrib.auth import get_user_model

    root = users["root"]
    _, cookie = await cookie_of(root)
    comm, connected, _ = await full_stack([cookie, ORIGIN, HOST])
    assert connected
    await hello_of(comm)
    await comm.send_to(text_data=json.dumps({"type": "join", "room": "team", "ref": "j"}))
    assert json.loads(await comm.receive_from(timeout=TIMEOUT))["type"] == "ack"
    # QuerySet.update sends no signal: only the periodic re-check can notice.
    update = get_user_model().objects.filter(pk=root.pk).update
    await database_sync_to_async(update)(is_superuser=False, is_staff=False)
    for _ in range(20):
        frame = json.loads(await comm.receive_from(timeout=TIMEOUT))
        if frame["type"] == "removed":
            assert frame == {"type": "removed", "room": "team", "reason": "forbidden"}
            break
    else:
        raise AssertionError("never removed")
    await comm.send_to(text_data=json.dumps({"type": "ping", "ref": "p"}))
    assert json.loads(await comm.receive_from(timeout=TIMEOUT)) == {"type": "pong", "ref": "p"}
    await comm.disconnect()


# -- rate limits and caps --------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@override_settings(REALTIME_FRAME_RATE="3/10s")
async def test_frame_flood_gets_errors_then_4029(users, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(session, "frame_clock", clock)
    _, cookie = await cookie_of(users["alice"])
    comm, connected, _ = await full_stack([cookie, ORIGIN, HOST])
    assert connected
    await hello_of(comm)
    ping = json.dumps({"type": "ping", "ref": "p"})
    for _ in range(3):
        await comm.send_to(text_data=ping)
        assert json.loads(await comm.receive_from(timeout=TIMEOUT))["type"] == "pong"
    await comm.send_to(text_data=ping)
    refused = json.loads(await comm.receive_from(timeout=TIMEOUT))
    assert refused["code"] == "rate_limited" and refused["retry_after"] > 0, refused
    clock.now += 10  # the client waited: allowed again, strikes forgiven
    await comm.send_to(text_data=ping)
    assert json.loads(await comm.receive_from(timeout=TIMEOUT))["type"] == "pong"
    clock.now += 20
    for _ in range(3):
        await comm.send_to(text_data=ping)
        assert json.loads(await comm.receive_from(timeout=TIMEOUT))["type"] == "pong"
    for _ in range(3):  # a second allowance, all refused
        await comm.send_to(bytes_data=b"\x00")
        assert json.loads(await comm.receive_from(timeout=TIMEOUT))["code"] == "rate_limited"
    await comm.send_to(text_data=ping)
    await closed_with(comm, 4029)


@override_settings(REALTIME_SEND_RATE="2/10s")
async def test_send_rate_is_per_user_across_connections(users, rooms):
    _, cookie = await cookie_of(users["alice"])
    comms = []
    for _ in range(2):
        comm, connected, _ = await full_stack([cookie, ORIGIN, HOST])
        assert connected
        await hello_of(comm)
        await comm.send_to(text_data=json.dumps({"type": "join", "room": "lobby", "ref": "j"}))
        comms.append(comm)

    async def send(comm, ref):
        frame = {"type": "send", "room": "lobby", "ref": ref, "payload": {"t": ref}}
        await comm.send_to(text_data=json.dumps(frame))
        for _ in range(50):
            reply = json.loads(await comm.receive_from(timeout=TIMEOUT))
            if reply.get("ref") == ref:
                return reply
        raise AssertionError(ref)

    assert (await send(comms[0], "a"))["type"] == "ack"
    assert (await send(comms[1], "b"))["type"] == "ack"
    limited = await send(comms[0], "c")
    assert limited["type"] == "error" and limited["code"] == "rate_limited", limited
    assert limited["retry_after"] > 0
    for comm in comms:
        await comm.disconnect()


@override_settings(REALTIME_MAX_CONNECTIONS_PER_USER=2, REALTIME_MAX_CONNECTIONS_PER_IP=3)
async def test_connection_caps_close_the_extra_connection_with_4029(users):
    _, alice = await cookie_of(users["alice"])
    _, bob = await cookie_of(users["bob"])
    opened = []
    for cookie in (alice, alice):
        comm, connected, _ = await full_stack([cookie, ORIGIN, HOST])
        assert connected
        await hello_of(comm)
        opened.append(comm)
    extra, connected, _ = await full_stack([alice, ORIGIN, HOST])
    assert connected  # accepted, then closed with the reason
    await closed_with(extra, 4029)
    comm, connected, _ = await full_stack([bob, ORIGIN, HOST])  # third from this address
    await hello_of(comm)
    opened.append(comm)
    over_ip, connected, _ = await full_stack([bob, ORIGIN, HOST])
    await closed_with(over_ip, 4029)
    await opened.pop(0).disconnect()  # a slot frees up when a connection ends
    comm, connected, _ = await full_stack([alice, ORIGIN, HOST])
    assert (await hello_of(comm))["user"]["name"] == "alice"
    opened.append(comm)
    for comm in opened:
        await comm.disconnect()


# -- payload limits --------------------------------------------------------------------------


def send_text(payload):
    return json.dumps({"type": "send", "room": "a", "payload": payload})


def test_key_count_limit_counts_every_level():
    parse(send_text({f"k{i}": i for i in range(MAX_PAYLOAD_KEYS)}), 10**6)
    with pytest.raises(FrameError, match="keys"):
        parse(send_text({f"k{i}": i for i in range(MAX_PAYLOAD_KEYS + 1)}), 10**6)
    nested = {"a": [{f"k{i}": 1 for i in range(600)}, {f"j{i}": 1 for i in range(600)}]}
    with pytest.raises(FrameError, match="keys"):
        parse(send_text(nested), 10**6)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 70_000,
        '{"type":"send","room":"a","payload":{"x":' + "1" * 5000 + "}}",
        '{"type":"send","room":"a","payload":{"x":1e999}}',
        '{"type":"send","room":"a","payload":{"x":NaN}}',
        '{"type":"send","room":"a","payload":{"x":"\\ud800"}}',
        '{"type":"send","room":"a","payload":{"\\udfff":1}}',
        '{"type":"join","room":"a","after_seq":' + "9" * 4000 + "}",
        '{"type":"join","room":"a","after_seq":-Infinity}',
        '{"type":"send","room":"a","payload":' + '{"a":' * 40 + "1" + "}" * 40 + "}",
    ],
)
def test_hostile_frames_become_frame_errors(text):
    with pytest.raises(FrameError):
        parse(text, 65536)


# -- CSRF on every state-changing endpoint ---------------------------------------------------

# Authenticated by something a browser does not send on its own: no CSRF check needed.
CSRF_EXEMPT = {"publish"}  # Authorization: Bearer REALTIME_API_KEY


def realtime_routes():
    from realtime import urls

    for pattern in urls.urlpatterns:
        assert isinstance(pattern, URLPattern | URLResolver)
        yield pattern


def test_every_state_changing_endpoint_refuses_a_cross_site_post(users, rooms):
    client = HttpClient(enforce_csrf_checks=True)
    client.force_login(users["root"])
    samples = {"room": "lobby", "rest": "anything"}
    checked = []
    for pattern in realtime_routes():
        kwargs = {k: samples[k] for k in pattern.pattern.regex.groupindex}
        url = reverse(f"realtime:{pattern.name}", kwargs=kwargs)
        # A well-formed request: CSRF is the only reason left to refuse it.
        body = {"room": "lobby", "payload": {"cross": "site"}}
        response = client.post(url, data=json.dumps(body), content_type="application/json")
        checked.append(pattern.name)
        assert response.status_code >= 400, (url, response.status_code)
        if pattern.name in CSRF_EXEMPT:
            assert response.status_code in (401, 403), url
            continue
        body = response.content.decode()
        assert response.status_code in (404, 405) or (
            response.status_code == 403 and "CSRF" in body
        ), (url, response.status_code, body)
    assert {"messages", "tickets", "publish"} <= set(checked)
    assert not Message.objects.exists()


# -- slow consumers: the transport probe -----------------------------------------------------


class FakeTransport:
    def __init__(self):
        self.dataBuffer = b"x" * 100
        self.offset = 40
        self._tempDataLen = 1000


class FakeProtocol:
    def __init__(self):
        self.transport = FakeTransport()
        self.send_queue = [(b"y" * 7, False)]
        self.closeHandshakeTimeout = 1

    def sendMessage(self, data, binary=False):
        pass


class SessionWrapper:  # channels' InstanceSessionWrapper keeps the server's send here
    def __init__(self, send):
        self.real_send = send

    async def send(self, message):
        await self.real_send(message)


def test_probe_finds_daphne_transport_behind_wrappers():
    protocol = FakeProtocol()

    async def handle_reply(protocol, message):
        pass

    send = SessionWrapper(functools.partial(handle_reply, protocol)).send
    probe = backpressure.probe(send)
    assert probe is not None and probe() == 60 + 1000 + 7
    backpressure.allow_close_grace(send, 9)
    assert protocol.closeHandshakeTimeout == 9

    async def plain(message):
        pass

    assert backpressure.probe(plain) is None


# -- system checks ---------------------------------------------------------------------------


def check_ids(messages):
    return [m.id for m in messages]


def test_w005_recognises_the_origin_check_and_its_wildcards():
    from realtime import checks

    assert "realtime.W005" not in check_ids(checks.check_asgi_application(None))
    with override_settings(ALLOWED_HOSTS=["*"]):
        assert "realtime.W005" in check_ids(checks.check_asgi_application(None))
    with override_settings(REALTIME_ALLOWED_ORIGINS=["*"]):
        assert "realtime.W005" in check_ids(checks.check_asgi_application(None))
    with override_settings(ALLOWED_HOSTS=["*"], REALTIME_ALLOWED_ORIGINS=["https://a.example"]):
        assert "realtime.W005" not in check_ids(checks.check_asgi_application(None))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (None, True),
        (["https://a.example", "http://localhost:8000"], True),
        (("*",), True),
        ("https://a.example", False),  # a string, not a list
        (["a.example"], False),  # no scheme
        (["https://a.example/path"], False),
        ([1], False),
    ],
)
def test_e003_validates_allowed_origins(value, ok):
    from realtime import checks

    with override_settings(REALTIME_ALLOWED_ORIGINS=value):
        errors = [m for m in checks.check_settings(None) if "ALLOWED_ORIGINS" in m.msg]
    assert (errors == []) is ok, errors


@override_settings(ALLOWED_HOSTS=[], DEBUG=True, REALTIME_ALLOWED_ORIGINS=None)
def test_debug_without_allowed_hosts_allows_local_origins_like_django():
    assert auth.origin_allowed(scope("127.0.0.1:8000"), "http://127.0.0.1:8000")
    assert auth.origin_allowed(scope("localhost:8000"), "http://localhost:8000")
    assert not auth.origin_allowed(scope("example.com"), "http://example.com")
    with override_settings(DEBUG=False):
        assert not auth.origin_allowed(scope("127.0.0.1:8000"), "http://127.0.0.1:8000")


@override_settings(REALTIME_SEND_RATE="2/10s")
def test_http_sends_share_the_users_send_rate(users, rooms):
    client = HttpClient(enforce_csrf_checks=True)
    client.force_login(users["alice"])
    client.get("/accounts/login/")
    token = client.cookies["csrftoken"].value
    url = reverse("realtime:messages", kwargs={"room": "lobby"})

    def post(n):
        return client.post(
            url,
            data=json.dumps({"payload": {"n": n}}),
            content_type="application/json",
            HTTP_X_CSRFTOKEN=token,
        )

    assert [post(n).status_code for n in range(2)] == [201, 201]
    limited = post(2)
    assert limited.status_code == 429, limited.content
    error = limited.json()["error"]
    assert error["code"] == "rate_limited" and error["retry_after"] > 0
    assert int(limited["Retry-After"]) >= 1
    assert Message.objects.count() == 2
