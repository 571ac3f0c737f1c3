"""Host pages of the demo: a room list and a room page."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from realtime import services
from realtime.models import Room


def room_list(request: HttpRequest) -> HttpResponse:
    rooms = [
        (room, services.can_read(room, request.user))
        for room in Room.objects.filter(archived=False)
    ]
    return render(request, "rooms.html", {"rooms": rooms})


def room_page(request: HttpRequest, slug: str) -> HttpResponse:
    room = get_object_or_404(Room, slug=slug, archived=False)
    return render(
        request, "room.html", {"room": room, "can_read": services.can_read(room, request.user)}
    )
