"""Live moderation: changes to rooms, memberships and messages reach live connections.

Signals (so the admin, the shell and any code path count) send, once the change commits, one
control message to the room's group on every process. Each session in the room then re-reads
its own rights from the database and, when it may no longer read, gets ``removed`` with the
reason (banned, forbidden, archived) and stops receiving the room. A retracted message becomes
a tombstone and every client gets ``retract``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver

from realtime import broker, services
from realtime.models import Membership, Message, Room
from realtime.protocol import ServerType, encode

logger = logging.getLogger(__name__)


def _run(fn: Callable[..., Coroutine[Any, Any, None]], *args: Any, **kwargs: Any) -> None:
    # The same loop as publish(): the server's when called from a sync view it serves, else
    # this process's publisher loop.
    from realtime.publishing import run_sync

    try:
        run_sync(fn, *args, **kwargs)
    except Exception:
        # The change itself is saved; rights are re-checked on the next join or send anyway.
        logger.warning("realtime: moderation broadcast %s failed", fn.__name__, exc_info=True)


def recheck(room: str, user_ids: list[Any] | None = None) -> None:
    """Make sessions in ``room`` (of ``user_ids``, or all) re-check their rights now."""
    _run(broker.publish_control, room, "recheck", user_ids=user_ids)


def kick(room: str, user_id: Any) -> None:
    """Remove a user's live connections from ``room`` (reason ``kicked``); they may rejoin."""
    _run(broker.publish_control, room, "kick", user_ids=[user_id])


def retract_frame(room: str, seq: int) -> str:
    """Encode a ``retract`` frame."""
    return encode({"type": ServerType.RETRACT, "room": room, "seq": seq})


def announce_retract(room: str, seq: int) -> None:
    """Tell every client in ``room`` that message ``seq`` was retracted."""
    _run(broker.publish_ephemeral, room, retract_frame(room, seq))


def retract(message_ids: list[int]) -> list[tuple[str, int]]:
    """Retract messages (tombstones keep their seq) and tell live clients once committed."""
    retracted = services.retract(message_ids)
    for room, seq in retracted:
        transaction.on_commit(functools.partial(announce_retract, room, seq))
    return retracted


def _on_commit(fn: Callable[[], None]) -> None:
    transaction.on_commit(fn)


@receiver(post_save, sender=Membership)
@receiver(post_delete, sender=Membership)
def _membership_changed(sender: Any, instance: Membership, **kwargs: Any) -> None:
    slug, user_id = instance.room.slug, instance.user_id
    _on_commit(lambda: recheck(slug, [user_id]))


@receiver(pre_save, sender=Room)
def _remember_old_slug(sender: Any, instance: Room, **kwargs: Any) -> None:
    if instance.pk is not None:
        old = Room.objects.filter(pk=instance.pk).values_list("slug", flat=True).first()
        instance._realtime_old_slug = old  # type: ignore[attr-defined]


@receiver(post_save, sender=Room)
def _room_changed(sender: Any, instance: Room, created: bool, **kwargs: Any) -> None:
    if created:
        return
    slugs = {instance.slug, getattr(instance, "_realtime_old_slug", None) or instance.slug}
    for slug in slugs:  # a renamed room: sessions joined under the old slug must go
        _on_commit(functools.partial(recheck, slug))


# Rooms being deleted in this thread: their messages go with them, and one recheck (every
# session gets `removed`) says more than a retract per message.
_deleting = threading.local()


@receiver(pre_delete, sender=Room)
def _room_deleting(sender: Any, instance: Room, **kwargs: Any) -> None:
    if not hasattr(_deleting, "rooms"):
        _deleting.rooms = set()
    _deleting.rooms.add(instance.pk)


@receiver(post_delete, sender=Room)
def _room_deleted(sender: Any, instance: Room, **kwargs: Any) -> None:
    rooms: set[int] = getattr(_deleting, "rooms", set())
    rooms.discard(instance.pk)
    slug = instance.slug
    _on_commit(lambda: recheck(slug))


@receiver(post_save, sender=Message)
def _message_saved(sender: Any, instance: Message, created: bool, **kwargs: Any) -> None:
    if instance.retracted and not created:
        slug, seq = instance.room.slug, instance.seq
        _on_commit(lambda: announce_retract(slug, seq))


@receiver(post_delete, sender=Message)
def _message_deleted(sender: Any, instance: Message, **kwargs: Any) -> None:
    # Deleting a row leaves a hole in the timeline (the admin retracts instead); clients still
    # drop the message.
    if instance.room_id in getattr(_deleting, "rooms", ()):
        return
    try:
        slug = instance.room.slug
    except Room.DoesNotExist:
        return
    seq = instance.seq
    _on_commit(lambda: announce_retract(slug, seq))
