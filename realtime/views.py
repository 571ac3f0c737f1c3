"""HTTP JSON API."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from realtime import services
from realtime.models import Room


@require_GET
def rooms(request: HttpRequest) -> JsonResponse:
    """The rooms the requesting user may join, with their head seq."""
    visible = [
        {
            "room": room.slug,
            "title": room.title or room.slug,
            "kind": room.kind,
            "seq": room.head_seq,
            "epoch": room.epoch,
        }
        for room in Room.objects.filter(archived=False)
        if services.can_read(room, request.user)
    ]
    return JsonResponse({"rooms": visible})
