"""No HTTP views: the baseline serves only its WebSocket route."""

from __future__ import annotations

from typing import Any

urlpatterns: list[Any] = []
