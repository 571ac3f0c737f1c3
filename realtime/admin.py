"""Admin for rooms, memberships and messages: the control plane of live rooms.

Every change here reaches live connections on every process (see moderation.py) and is
logged in the admin's history (LogEntry).
"""

from __future__ import annotations

import threading
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from realtime import moderation, presence
from realtime.errors import RealtimeError
from realtime.models import Membership, Message, Room

_page = threading.local()  # online counts of the change list being rendered


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


class AnnouncementForm(forms.Form):
    text = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "cols": 60}), max_length=4000)


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "kind", "online", "head_seq", "epoch", "archived"]
    list_filter = ["kind", "archived"]
    search_fields = ["slug", "title"]
    readonly_fields = ["head_seq", "archived_at", "created_at"]
    inlines = [MembershipInline]
    actions = ["announce", "archive", "unarchive"]
    change_list_template = "admin/realtime/room/change_list.html"

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        try:
            _page.online = presence.online_counts(list(Room.objects.values_list("slug", flat=True)))
        except Exception:
            _page.online = None  # presence store down: the column says so
        return super().changelist_view(request, extra_context)

    @admin.display(description="online now")
    def online(self, obj: Room) -> str:
        counts = getattr(_page, "online", None)
        return "?" if counts is None else str(counts.get(obj.slug, 0))

    def get_urls(self) -> list[URLPattern]:
        live = path("live/", self.admin_site.admin_view(self.live_view), name="realtime_live")
        return [live, *super().get_urls()]

    def live_view(self, request: HttpRequest) -> HttpResponse:
        """Live totals per process: connections, rooms in use, messages/s."""
        try:
            processes, error = presence.process_stats(), ""
        except Exception as exc:
            processes, error = [], f"presence store unavailable: {exc}"
        context = {
            **self.admin_site.each_context(request),
            "title": "Live totals per process",
            "processes": processes,
            "totals": {
                key: sum(p[key] for p in processes)
                for key in ("connections", "rooms", "messages_per_s", "deliveries_per_s")
            },
            "error": error,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/realtime/live.html", context)

    @admin.action(description="Post an announcement to the selected rooms")
    def announce(self, request: HttpRequest, queryset: QuerySet[Room]) -> HttpResponse | None:
        from realtime.publishing import publish

        form = AnnouncementForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            posted = 0
            for room in queryset:
                try:
                    message = publish(room.slug, {"text": form.cleaned_data["text"]})
                except RealtimeError as exc:  # archived, or the channel layer is down
                    self.message_user(request, f"{room.slug}: not posted: {exc}", messages.ERROR)
                    continue
                posted += 1
                self.log_change(request, room, f"Posted announcement #{message['seq']}.")
            if posted:
                self.message_user(request, f"Announcement posted to {posted} room(s).")
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Post an announcement",
            "rooms": queryset,
            "form": form,
            "opts": self.model._meta,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/realtime/room/announce.html", context)

    def _set_archived(self, request: HttpRequest, queryset: QuerySet[Room], value: bool) -> None:
        for room in queryset:
            if room.archived != value:
                room.archived = value
                room.save()  # signals: live connections get `removed` (archived)
                self.log_change(request, room, "Archived." if value else "Unarchived.")

    @admin.action(description="Archive the selected rooms (everyone is removed)")
    def archive(self, request: HttpRequest, queryset: QuerySet[Room]) -> None:
        self._set_archived(request, queryset, True)

    @admin.action(description="Unarchive the selected rooms")
    def unarchive(self, request: HttpRequest, queryset: QuerySet[Room]) -> None:
        self._set_archived(request, queryset, False)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "room", "role", "banned", "created_at"]
    list_filter = ["role", "banned", "room"]
    search_fields = ["user__username", "room__slug"]
    raw_id_fields = ["user"]
    list_select_related = ["user", "room"]
    actions = ["ban", "unban", "kick"]

    def _set_banned(
        self, request: HttpRequest, queryset: QuerySet[Membership], value: bool
    ) -> None:
        for membership in queryset.select_related("room", "user"):
            if membership.banned != value:
                membership.banned = value
                membership.save()  # signals: the user's connections get `removed` (banned)
                self.log_change(request, membership, "Banned." if value else "Unbanned.")

    @admin.action(description="Ban the selected members (removed from the room at once)")
    def ban(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        self._set_banned(request, queryset, True)

    @admin.action(description="Lift the ban of the selected members")
    def unban(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        self._set_banned(request, queryset, False)

    @admin.action(description="Kick the selected members' live connections (they may rejoin)")
    def kick(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        for membership in queryset.select_related("room", "user"):
            moderation.kick(membership.room.slug, membership.user_id)
            self.log_change(request, membership, "Kicked live connections.")
        self.message_user(request, f"Kicked {queryset.count()} member(s).", messages.SUCCESS)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "sender", "preview", "retracted", "created_at"]
    list_filter = ["room", "retracted", "created_at"]
    search_fields = ["room__slug", "sender__username", "client_msg_id"]
    list_select_related = ["room", "sender"]
    readonly_fields = ["room", "seq", "sender", "client_msg_id", "created_at"]
    date_hierarchy = "created_at"
    actions = ["retract"]

    @admin.display(description="payload")
    def preview(self, obj: Message) -> str:
        if obj.retracted:
            return "(retracted)"
        text = str(obj.payload.get("text", obj.payload)) if isinstance(obj.payload, dict) else ""
        return text if len(text) <= 80 else text[:77] + "..."

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Seqs are allocated only by services.append_message (publish() or a client send).
        return False

    # Deleting retracts: the row stays as a tombstone so the timeline keeps every seq, and
    # live clients get `retract`. The deletion is logged by the admin as usual.
    def delete_model(self, request: HttpRequest, obj: Message) -> None:
        moderation.retract([obj.pk])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        moderation.retract(list(queryset.values_list("pk", flat=True)))

    @admin.action(description="Retract the selected messages (clients remove them now)")
    def retract(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        for message in queryset.filter(retracted=False).select_related("room"):
            moderation.retract([message.pk])
            self.log_change(request, message, "Retracted.")
