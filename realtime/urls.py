from __future__ import annotations

from django.urls import path

from realtime import views

app_name = "realtime"

urlpatterns = [
    path("api/rooms/", views.rooms, name="rooms"),
]
