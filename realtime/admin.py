"""Admin for rooms, memberships and messages."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from realtime.models import Membership, Message, Room


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "kind", "head_seq", "epoch", "archived", "created_at"]
    list_filter = ["kind", "archived"]
    search_fields = ["slug", "title"]
    readonly_fields = ["head_seq", "archived_at", "created_at"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "room", "role", "banned", "created_at"]
    list_filter = ["role", "banned", "room"]
    search_fields = ["user__username", "room__slug"]
    raw_id_fields = ["user"]
    list_select_related = ["user", "room"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "sender", "preview", "retracted", "created_at"]
    list_filter = ["room", "retracted", "created_at"]
    search_fields = ["room__slug", "sender__username", "client_msg_id"]
    list_select_related = ["room", "sender"]
    readonly_fields = ["room", "seq", "sender", "client_msg_id", "created_at"]
    date_hierarchy = "created_at"

    @admin.display(description="payload")
    def preview(self, obj: Message) -> str:
        text = str(obj.payload.get("text", obj.payload)) if isinstance(obj.payload, dict) else ""
        return text if len(text) <= 80 else text[:77] + "..."

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Seqs are allocated only by services.append_message (publish() or a client send).
        return False
