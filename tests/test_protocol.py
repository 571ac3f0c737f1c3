import json

import pytest

from realtime import protocol
from realtime.protocol import ClientType, ErrorCode, FrameError, parse

LIMIT = 1024


def parse_obj(obj, limit=LIMIT):
    return parse(json.dumps(obj), limit)


def error_of(text, limit=LIMIT):
    with pytest.raises(FrameError) as info:
        parse(text, limit)
    return info.value


def test_parse_join_with_resume_fields():
    frame = parse_obj({"type": "join", "room": "lobby", "ref": "1", "after_seq": 7, "epoch": 2})
    assert frame.type is ClientType.JOIN
    assert (frame.room, frame.ref, frame.after_seq, frame.epoch) == ("lobby", "1", 7, 2)


def test_parse_send_keeps_payload_and_client_msg_id():
    frame = parse_obj(
        {"type": "send", "room": "a", "ref": "r", "payload": {"text": "hi"}, "client_msg_id": "c1"}
    )
    assert frame.payload == {"text": "hi"}
    assert frame.client_msg_id == "c1"


def test_history_limit_defaults_to_50():
    assert parse_obj({"type": "history", "room": "a"}).limit == 50


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", ErrorCode.BAD_FRAME),
        ("[1, 2]", ErrorCode.BAD_FRAME),
        ('"join"', ErrorCode.BAD_FRAME),
        ("{}", ErrorCode.BAD_FRAME),
        ('{"type": 5}', ErrorCode.BAD_FRAME),
        ('{"type": "explode"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "join"}', ErrorCode.INVALID_ROOM),
        ('{"type": "join", "room": "Lobby"}', ErrorCode.INVALID_ROOM),
        ('{"type": "join", "room": "../etc"}', ErrorCode.INVALID_ROOM),
        ('{"type": "join", "room": "a\\u0000"}', ErrorCode.INVALID_ROOM),
        ('{"type": "join", "room": "lobby\\n"}', ErrorCode.INVALID_ROOM),
        ('{"type": "join", "room": 7}', ErrorCode.INVALID_ROOM),
        ('{"type": "join", "room": "a", "after_seq": -1}', ErrorCode.BAD_FRAME),
        ('{"type": "join", "room": "a", "after_seq": "3"}', ErrorCode.BAD_FRAME),
        ('{"type": "join", "room": "a", "after_seq": true}', ErrorCode.BAD_FRAME),
        ('{"type": "join", "room": "a", "after_seq": 1.5}', ErrorCode.BAD_FRAME),
        (
            '{"type": "join", "room": "a", "after_seq": 99999999999999999999999}',
            ErrorCode.BAD_FRAME,
        ),
        ('{"type": "send", "room": "a"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": "hi"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": [1]}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": {"x": NaN}}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": {"x": Infinity}}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": {"x": "\\ud800"}}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": {"x": "\\u0000"}}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": {}, "client_msg_id": ""}', ErrorCode.BAD_FRAME),
        ('{"type": "history", "room": "a", "limit": 0}', ErrorCode.BAD_FRAME),
        ('{"type": "history", "room": "a", "limit": 101}', ErrorCode.BAD_FRAME),
        ('{"type": "ping", "ref": 12}', ErrorCode.BAD_FRAME),
        ('{"type": "ping", "ref": "\\ud800"}', ErrorCode.BAD_FRAME),
        ('{"type": "ping", "ref": "a\\u0000"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "room": "a", "payload": {}, "client_msg_id": "\\udfff"}', "bad_frame"),
    ],
)
def test_bad_frames_get_their_code(text, code):
    assert error_of(text).code == code


def test_ref_is_echoed_in_errors_once_known():
    assert error_of('{"type": "join", "ref": "r9", "room": "BAD"}').ref == "r9"


def test_overlong_ref_is_refused():
    assert error_of(json.dumps({"type": "ping", "ref": "x" * 65})).code == ErrorCode.BAD_FRAME


def test_oversize_frame_refused_before_parsing():
    # Not even valid JSON: proves the size check runs before the parser.
    assert error_of("{" * (LIMIT + protocol.ENVELOPE_ALLOWANCE + 1)).code == ErrorCode.TOO_LARGE


def test_payload_over_limit_is_too_large():
    text = json.dumps({"type": "send", "room": "a", "payload": {"t": "é" * 600}})
    assert error_of(text).code == ErrorCode.TOO_LARGE


def test_deep_nesting_is_bad_frame_not_recursion_error():
    text = '{"type": "send", "room": "a", "payload": ' + '{"a":' * 500 + "1" + "}" * 501
    assert error_of(text, limit=10_000).code == ErrorCode.BAD_FRAME


def test_huge_bracket_bomb_is_bad_frame():
    assert error_of("[" * 100_000, limit=200_000).code == ErrorCode.BAD_FRAME


def test_huge_integer_is_bad_frame():
    assert error_of('{"type": "ping", "x": ' + "9" * 5000 + "}", limit=10_000).code == "bad_frame"


def test_unknown_fields_are_ignored():
    assert parse_obj({"type": "ping", "future": {"x": 1}}).type is ClientType.PING


def test_encode_is_compact_utf8_json():
    assert protocol.encode({"type": "pong", "ref": "é"}) == '{"type":"pong","ref":"é"}'


def test_error_frame_shape():
    frame = json.loads(protocol.error_frame(ErrorCode.RATE_LIMITED, "slow", "r1", retry_after=2))
    assert frame == {
        "type": "error",
        "code": "rate_limited",
        "message": "slow",
        "ref": "r1",
        "retry_after": 2,
    }


@pytest.mark.parametrize("room", ["a", "0", "lobby", "a-b_c", "x" * 64])
def test_valid_rooms(room):
    assert protocol.is_valid_room(room)


@pytest.mark.parametrize("room", ["", "-a", "_a", "A", "x" * 65, "a b", "é", "a/b", None, 3])
def test_invalid_rooms(room):
    assert not protocol.is_valid_room(room)
