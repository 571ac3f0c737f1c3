"""What the HTTP transports (sse.py, longpoll.py) share: the room list, the cursor, the joins.

A cursor says, for each room, the last seq a client received and the room's epoch:
``lobby:12:1,team:4:1`` (``room:seq`` without the epoch is accepted too). The transports join
each room through ``session.Session`` with ``after_seq`` (and ``epoch``) taken from the cursor,
so replay, ``recovered: false`` and ordering are exactly the WebSocket's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from realtime.protocol import ErrorCode, FrameError, ServerType, encode, is_valid_room
from realtime.session import Session

# Rooms one SSE stream or poll may follow; a cursor for all of them stays a short header.
MAX_ROOMS = 20
_MAX_INT = 2**63 - 1
_ENTRY = re.compile(r"([a-z0-9][a-z0-9_-]{0,63}):([0-9]{1,19})(?::([0-9]{1,19}))?")


@dataclass
class Position:
    """Where a client is in one room's timeline."""

    seq: int
    epoch: int | None = None


def parse_rooms(raw: str | None) -> list[str]:
    """The ``rooms`` parameter: comma-separated slugs, duplicates dropped, order kept."""
    if raw is None or not raw.strip():
        return []
    rooms: list[str] = []
    for part in raw.split(","):
        slug = part.strip()
        if not is_valid_room(slug):
            raise FrameError(
                ErrorCode.INVALID_ROOM,
                "rooms must be comma-separated slugs (^[a-z0-9][a-z0-9_-]{0,63}$); "
                f"got {slug!r:.80}",
            )
        if slug not in rooms:
            rooms.append(slug)
    if len(rooms) > MAX_ROOMS:
        raise FrameError(ErrorCode.BAD_FRAME, f"at most {MAX_ROOMS} rooms per request")
    return rooms


def parse_cursor(raw: str | None, name: str = "cursor") -> dict[str, Position]:
    """A cursor (``room:seq[:epoch]``, comma-separated); empty or absent is no position."""
    if raw is None or not raw.strip():
        return {}
    positions: dict[str, Position] = {}
    for part in raw.split(","):
        match = _ENTRY.fullmatch(part.strip())
        if match is None or int(match[2]) > _MAX_INT or int(match[3] or 0) > _MAX_INT:
            raise FrameError(
                ErrorCode.BAD_FRAME,
                f"{name} must be comma-separated room:seq or room:seq:epoch entries; "
                f"got {part.strip()!r:.80}",
            )
        epoch = int(match[3]) if match[3] is not None else None
        positions[match[1]] = Position(int(match[2]), epoch)
    if len(positions) > MAX_ROOMS:
        raise FrameError(ErrorCode.BAD_FRAME, f"{name} names more than {MAX_ROOMS} rooms")
    return positions


def format_cursor(positions: dict[str, Position]) -> str:
    """The cursor text of ``positions``, in their order."""
    return ",".join(
        f"{room}:{p.seq}" if p.epoch is None else f"{room}:{p.seq}:{p.epoch}"
        for room, p in positions.items()
    )


class Tracker:
    """Follows the frames a session emits and keeps every joined room's position."""

    def __init__(self, rooms: list[str], start: dict[str, Position]) -> None:
        self.rooms = rooms
        self.positions = {room: start[room] for room in rooms if room in start}
        self.joined: set[str] = set()
        self.join_errors: dict[str, dict[str, Any]] = {}

    def see(self, frame: dict[str, Any]) -> None:
        """Update the positions after ``frame`` (already emitted by the session)."""
        kind, room = frame.get("type"), frame.get("room")
        if kind == ServerType.MESSAGE and isinstance(room, str):
            position = self.positions.get(room)
            if position is not None and frame["seq"] > position.seq:
                position.seq = frame["seq"]
        elif kind == ServerType.ACK and "recovered" in frame and isinstance(room, str):
            # A join's reply. Recovered: the replay that follows moves the seq on. Otherwise
            # the timeline restarts at the head (the client reloads its history).
            self.joined.add(room)
            old = self.positions.get(room)
            seq = old.seq if frame["recovered"] and old is not None else frame["seq"]
            self.positions[room] = Position(seq, frame["epoch"])
        elif kind == ServerType.REMOVED and isinstance(room, str):
            self.positions.pop(room, None)
            self.joined.discard(room)
        elif kind == ServerType.ERROR and frame.get("ref") in self.rooms:
            # Joins are sent with ref = the room (join_all), and only joins: it was refused.
            room = frame["ref"]
            self.join_errors[room] = frame
            self.positions.pop(room, None)

    def see_text(self, text: str) -> dict[str, Any]:
        """Decode one emitted frame and ``see`` it."""
        frame: dict[str, Any] = json.loads(text)
        self.see(frame)
        return frame

    @property
    def cursor(self) -> str:
        return format_cursor(self.positions)

    def all_refused(self) -> dict[str, Any] | None:
        """The first join error when rooms were asked for and none could be joined."""
        if not self.rooms or self.joined or not self.join_errors:
            return None
        return self.join_errors[next(r for r in self.rooms if r in self.join_errors)]


async def join_all(session: Session, rooms: list[str], start: dict[str, Position]) -> None:
    """Join every room through the session, resuming from ``start``; replies carry ref=room."""
    for room in rooms:
        frame: dict[str, Any] = {"type": "join", "room": room, "ref": room}
        position = start.get(room)
        if position is not None:
            frame["after_seq"] = position.seq
            if position.epoch is not None:
                frame["epoch"] = position.epoch
        await session.receive_text(encode(frame))
