"""Awaiting with a time limit, with no extra task on the hot path.

Contract: `await within(awaitable, timeout_s)` returns what `awaitable` returns, or raises the
builtin `TimeoutError` once `timeout_s` seconds have passed (the awaitable is then cancelled).
`timeout_s=None` waits without a limit. Callers catch `TimeoutError` only.

Why not plain `asyncio.wait_for`: on Python 3.11 it runs the awaitable in a task of its own, which
costs the event loop extra turns for every message read (both sides read under a limit once per
round); `asyncio.timeout` arms a timer on the calling task instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    async with asyncio.timeout(timeout_s):
        return await awaitable
