"""wire.py: autobahn's per-connection option dump formatted only if logged; the one-write reply."""

import pprint

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket import protocol

from realtime import wire


class _Recorder:
    def __init__(self):
        self.calls = []

    def debug(self, fmt, **kwargs):
        self.calls.append((fmt, kwargs))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_connection_made_defers_the_option_dump_and_it_still_formats():
    wire.defer_handshake_log()
    wire.defer_handshake_log()  # idempotent: the swap is not stacked
    proto = WebSocketServerFactory().buildProtocol(None)
    assert isinstance(proto, protocol.WebSocketServerProtocol)
    proto.log = _Recorder()
    proto._connectionMade()
    (attrs,) = [kw["attrs"] for fmt, kw in proto.log.calls if "attrs" in kw]
    assert isinstance(attrs, wire._Pformat)  # nothing formatted yet
    text = f"\n{attrs}"
    assert text.startswith("\n[(") and "'autoPingInterval'" in text
    assert text == "\n" + pprint.pformat(attrs.obj)


def test_every_other_caller_still_gets_a_string():
    wire.defer_handshake_log()
    value = {"b": [1, 2], "a": "x" * 100}
    assert protocol.pformat(value) == pprint.pformat(value)
    assert protocol.pformat(value, width=20) == pprint.pformat(value, width=20)
    timings = protocol.Timings()
    timings.track("x")
    assert str(timings).startswith("{")


def test_autobahn_highlights_come_out_as_plain_text(monkeypatch):
    from autobahn import util
    from autobahn.twisted.websocket import WebSocketServerProtocol

    monkeypatch.setattr(util, "_HAS_CLICK", True)  # as when click is installed
    wire.defer_handshake_log()
    assert util._HAS_CLICK is False
    assert util.hlval(42) == "42"
    assert util.hltype(WebSocketServerProtocol.dataReceived) == (
        "<autobahn.twisted.websocket.WebSocketAdapterProtocol.dataReceived>"
    )


class _Protocol:
    state = wire._OPEN
    send_state = wire._GROUND

    def __init__(self):
        self.send_queue = []


class _Transport:
    """Twisted's tcp.Server as the fast path reads it: its buffer and its write."""

    disconnecting = False
    connected = True

    def __init__(self, buffered=b""):
        self.dataBuffer = buffered
        self.offset = 0
        self._tempDataLen = 0
        self.written = []

    def write(self, data):
        self.written.append(data)


class _Socket:
    def __init__(self, takes=None):
        self.takes = takes  # at most this many bytes per send (None: everything)
        self.sent = []

    def send(self, data):
        n = len(data) if self.takes is None else min(self.takes, len(data))
        self.sent.append(bytes(data[:n]))
        return n


def _frames(data):
    """Decode unmasked text frames (short payloads only)."""
    out = []
    while data:
        assert data[0] == 0x81 and data[1] < 126
        out.append(data[2 : 2 + data[1]].decode())
        data = data[2 + data[1] :]
    return out


def test_write_many_sends_the_frames_of_a_reply_in_one_write_and_in_order():
    sock = _Socket()
    writer = wire.Writer(_Protocol(), _Transport(), sock)
    assert writer.write_many(['{"type":"ack"}', '{"type":"presence_state"}']) == 0
    assert len(sock.sent) == 1
    assert _frames(sock.sent[0]) == ['{"type":"ack"}', '{"type":"presence_state"}']


def test_write_many_queues_behind_buffered_bytes_and_buffers_what_the_socket_left():
    transport = _Transport(buffered=b"xyz")
    sock = _Socket()
    pending = wire.Writer(_Protocol(), transport, sock).write_many(["a", "bc"])
    assert sock.sent == []  # never ahead of what Twisted still holds
    assert _frames(transport.written[0]) == ["a", "bc"] and pending == 3 + 7

    transport, sock = _Transport(), _Socket(takes=4)
    pending = wire.Writer(_Protocol(), transport, sock).write_many(["a", "bc"])
    assert sock.sent[0] + transport.written[0] == wire.text_frame("a") + wire.text_frame("bc")
    assert pending == 3


def test_write_many_declines_when_the_socket_is_not_plainly_open():
    protocol = _Protocol()
    protocol.send_queue.append((b"queued", False))
    assert wire.Writer(protocol, _Transport(), _Socket()).write_many(["a"]) is None
    closing = _Transport()
    closing.disconnecting = True
    assert wire.Writer(_Protocol(), closing, _Socket()).write_many(["a"]) is None
