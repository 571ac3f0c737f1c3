"""Host pages of the demo: a room list and a room page."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from realtime import services
from realtime.models import Room

PAGE_SIZE = 50  # messages rendered with the page; the rest are a "Load older" away


def room_list(request: HttpRequest) -> HttpResponse:
    rooms = [
        (room, services.can_read(room, request.user))
        for room in Room.objects.filter(archived=False)
    ]
    return render(request, "rooms.html", {"rooms": rooms})


def room_page(request: HttpRequest, slug: str) -> HttpResponse:
    room = get_object_or_404(Room, slug=slug, archived=False)
    can_read = services.can_read(room, request.user)
    # The newest messages up to the head read with the room: {% realtime_script room %} puts
    # that head in the page, so the client resumes right after the last message shown here.
    messages = (
        services.history(room.slug, request.user, room.head_seq + 1, PAGE_SIZE)
        if can_read and room.head_seq
        else []
    )
    return render(
        request,
        "room.html",
        {"room": room, "can_read": can_read, "messages": messages, "page_size": PAGE_SIZE},
    )
