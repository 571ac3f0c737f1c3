"""``manage.py realtime_publish ROOM --json '{...}'`` (or ``--text "hello"``)."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from realtime.errors import RealtimeError
from realtime.protocol import encode
from realtime.publishing import publish


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class Command(BaseCommand):
    help = (
        "Publish a server message (sender null) into a room: stored with the next seq and "
        "broadcast to every connected client. Prints the stored message as JSON."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("room", help="the room's slug, e.g. lobby")
        payload = parser.add_mutually_exclusive_group(required=True)
        payload.add_argument(
            "--json", dest="json_payload", metavar="JSON", help="the payload, a JSON object"
        )
        payload.add_argument("--text", help="shorthand for --json '{\"text\": TEXT}'")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["text"] is not None:
            payload: Any = {"text": options["text"]}
        else:
            try:
                payload = json.loads(options["json_payload"], parse_constant=_reject_constant)
            except (ValueError, RecursionError) as exc:
                raise CommandError(f"--json is not valid JSON: {exc}") from None
            if not isinstance(payload, dict):
                raise CommandError(
                    f'--json must be a JSON object, e.g. \'{{"text": "hi"}}\', '
                    f"not a {type(payload).__name__}"
                )
        try:
            message = publish(options["room"], payload)
        except RealtimeError as exc:
            raise CommandError(f"{exc.message} ({exc.code})") from None
        if options["verbosity"] > 0:
            self.stdout.write(encode(message))
