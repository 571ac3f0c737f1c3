from __future__ import annotations

from django.urls import path

from realtime import metrics, views

app_name = "realtime"

urlpatterns = [
    path("api/rooms/", views.rooms, name="rooms"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
