"""Synchronous database code called from async code, one ``database_sync_to_async`` per function.

``database_sync_to_async(fn)`` builds a ``SyncToAsync`` object on every call (it inspects
``fn`` each time); the hot paths (session auth, join, gap fill) call the same few functions
once or twice per connection. ``on_db_thread(fn)`` returns the one wrapper made for ``fn``, so
only the call itself is paid. The function is looked up by the caller at call time, so a
replaced module attribute (a test's monkeypatch) gets a wrapper of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from channels.db import database_sync_to_async

P = ParamSpec("P")
R = TypeVar("R")

_wrappers: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def on_db_thread(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """``database_sync_to_async(fn)``, made once per function (plain functions only)."""
    wrapper = _wrappers.get(fn)
    if wrapper is None:
        wrapper = _wrappers[fn] = database_sync_to_async(fn)
    return wrapper  # type: ignore[no-any-return]
