"""Rooms, memberships and the message timeline."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from realtime.protocol import ROOM_RE

room_slug_validator = RegexValidator(
    ROOM_RE.pattern + r"\Z",
    "Lowercase letters, digits, '-' and '_', starting with a letter or digit; at most 64.",
)


class Room(models.Model):
    class Kind(models.TextChoices):
        PUBLIC = "public", "Public: any logged-in user joins and sends"
        PRIVATE = "private", "Private: members only"
        ANNOUNCE = "announce", "Announce: everyone reads, staff and moderators send"

    slug = models.CharField(max_length=64, unique=True, validators=[room_slug_validator])
    title = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.PUBLIC)
    # Bumped when the timeline is reset, so clients know their after_seq no longer applies.
    epoch = models.PositiveIntegerField(default=1)
    # Last allocated seq; only services.append_message writes it.
    head_seq = models.PositiveBigIntegerField(default=0, editable=False)
    archived = models.BooleanField(default=False)
    archived_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.title or self.slug

    def save(self, *args: object, **kwargs: object) -> None:
        if self.archived and self.archived_at is None:
            self.archived_at = timezone.now()
        elif not self.archived:
            self.archived_at = None
        super().save(*args, **kwargs)  # type: ignore[arg-type]


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member", "Member"
        MODERATOR = "moderator", "Moderator"

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="realtime_memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    banned = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "user"], name="realtime_membership_unique")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.room}"


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveBigIntegerField(editable=False)
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="realtime_messages",
    )
    payload = models.JSONField(default=dict)
    client_msg_id = models.CharField(max_length=64, null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # A retracted message stays in the timeline as a tombstone so seqs stay contiguous.
    retracted = models.BooleanField(default=False)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="realtime_message_room_seq"),
            models.UniqueConstraint(
                fields=["room", "sender", "client_msg_id"],
                condition=Q(client_msg_id__isnull=False),
                name="realtime_message_client_msg_id",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room.slug}#{self.seq}"
