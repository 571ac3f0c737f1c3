"""wire.py's handshake tuning: autobahn's per-connection option dump is formatted only if logged."""

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
