"""Awaiting with a time limit: one exception type on every Python, no extra task on the hot path.

Contract: `await within(awaitable, timeout_s)` returns what `awaitable` returns, or raises the
builtin `TimeoutError` once `timeout_s` seconds have passed (the awaitable is then cancelled).
`timeout_s=None` waits without a limit. Callers catch `TimeoutError` only.

Why not plain `asyncio.wait_for`: on Python 3.10 it raises `asyncio.TimeoutError`, a different
class from the builtin there (they are one class from 3.11), so an `except TimeoutError` misses it;
and on 3.10 and 3.11 it runs the awaitable in a task of its own, which costs the event loop extra
turns for every message read (both sides read under a limit once per round). `asyncio.timeout`
(3.11+) arms a timer on the calling task instead; 3.10 keeps `wait_for`, its error translated.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await awaitable
    try:  # Python 3.10
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError as exc:  # not the builtin TimeoutError on 3.10
        raise TimeoutError(str(exc)) from None
