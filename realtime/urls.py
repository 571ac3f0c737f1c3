from __future__ import annotations

from django.urls import path, re_path

from realtime import longpoll, metrics, sse, views

app_name = "realtime"

urlpatterns = [
    path("api/rooms/", views.rooms, name="rooms"),
    path("api/rooms/<str:room>/messages", views.messages, name="messages"),
    path("api/rooms/<str:room>/presence", views.presence, name="presence"),
    path("api/publish", views.publish, name="publish"),
    path("api/tickets", views.tickets, name="tickets"),
    # Keep last among the api/ routes: any other api/ path gets a JSON 404, not HTML.
    re_path(r"^api/(?P<rest>.*)$", views.not_found, name="api-not-found"),
    path("metrics", metrics.metrics_view, name="metrics"),
    # Fallback transports (docs/transports.md); deploy/nginx/ does not buffer these paths.
    path("sse/", sse.sse, name="sse"),
    path("poll/", longpoll.poll, name="poll"),
]
