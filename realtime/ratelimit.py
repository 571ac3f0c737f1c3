"""Rate limits written as strings ("20/10s": 20 events per 10 seconds), with a clock to inject.

The algorithm is GCRA (a token bucket kept as one timestamp): a rate of N per P seconds lets
a burst of N through, then one event every P/N seconds. ``hit`` answers None when the event
is allowed, or the seconds to wait before retrying. The Redis backend keeps the state in one
key per subject, updated by a Lua script, so a limit holds across every process; the memory
backend holds within one process (the in-memory layer's single process).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from realtime import store

_RATE_RE = re.compile(r"\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
KEY_PREFIX = "realtime:rate:"

Clock = Callable[[], float]


@dataclass(frozen=True)
class Rate:
    count: int
    period: float  # seconds

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


@functools.lru_cache(maxsize=128)
def parse_rate(text: str) -> Rate:
    """Parse "20/10s", "5/s", "100/m" or "1000/1h"; ValueError with the reason otherwise."""
    match = _RATE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a rate like '20/10s', '5/s', '100/m' or '1000/1h'")
    count, amount, unit = int(match.group(1)), match.group(2), match.group(3)
    period = (float(amount) if amount else 1.0) * _UNITS[unit]
    if count < 1 or period <= 0:
        raise ValueError(f"{text!r} is not a usable rate: the count and period must be positive")
    return Rate(count, period)


class Limiter(Protocol):
    async def hit(self, key: str, rate: Rate) -> float | None: ...


def _gcra(tat: float, now: float, rate: Rate) -> tuple[float | None, float]:
    """(retry_after or None, the new theoretical arrival time)."""
    tat = max(tat, now)
    allowance = rate.period - rate.interval  # how far ahead of now the bucket may run
    if tat - now > allowance + 1e-9:
        return tat - now - allowance, tat
    return None, tat + rate.interval


class MemoryLimiter:
    """Limits within this process."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}

    async def hit(self, key: str, rate: Rate) -> float | None:
        now = self.clock()
        retry, tat = _gcra(self._tat.get(key, now), now, rate)
        if retry is None:
            self._tat[key] = tat
            if len(self._tat) > 100_000:  # forget the oldest subjects (dicts keep order)
                for stale in list(self._tat)[:10_000]:
                    del self._tat[stale]
        return retry


# KEYS[1] = subject; ARGV = now, period, interval. Returns retry_after as a string, or "".
_GCRA_SCRIPT = """
local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local allowance = period - interval
if tat - now > allowance + 1e-9 then
  return tostring(tat - now - allowance)
end
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil(period * 1000) + 1000)
return ''
"""
_GCRA = store.Script(_GCRA_SCRIPT)


class RedisLimiter:
    """Limits across every process that shares the Redis."""

    def __init__(self, client: Any, clock: Clock = time.time) -> None:
        self.clock = clock
        self._client = client

    async def hit(self, key: str, rate: Rate) -> float | None:
        # Through the loop's auto-pipeline: concurrent sends share a round trip.
        args = [repr(self.clock()), repr(rate.period), repr(rate.interval)]
        result = await _GCRA(self._client, [KEY_PREFIX + key], args)
        text = result.decode() if isinstance(result, bytes) else str(result)
        return float(text) if text else None


_memory = MemoryLimiter()
_redis = store.bound(RedisLimiter)


def get_limiter() -> Limiter:
    """Redis-backed when realtime's channel layer is Redis, else this process's memory."""
    return _redis() or _memory
