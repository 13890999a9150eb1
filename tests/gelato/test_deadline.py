"""`gelato.deadline.within`: the value, or the builtin TimeoutError with the awaitable cancelled,
on both of its paths (`asyncio.timeout` from 3.11, `wait_for` with its error translated on 3.10)."""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import pytest

from gelato import deadline
from gelato.deadline import within


@pytest.fixture(params=["3.11+", "3.10"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "3.10":  # the wait_for path, as Python 3.10 takes it
        monkeypatch.setattr(deadline, "sys", SimpleNamespace(version_info=(3, 10, 13)))
    elif sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout needs Python 3.11")
    return str(request.param)


def test_returns_the_value_within_the_limit(path: str) -> None:
    async def answer() -> int:
        await asyncio.sleep(0.001)
        return 42

    async def main() -> tuple[int, int]:
        return await within(answer(), 5.0), await within(answer(), None)

    assert asyncio.run(main()) == (42, 42)


def test_past_the_limit_raises_the_builtin_timeout_and_cancels(path: str) -> None:
    cancelled = []

    async def silent() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> BaseException | None:
        try:
            await within(silent(), 0.01)
        except TimeoutError as exc:  # the builtin class, what every caller catches
            return exc
        return None

    assert type(asyncio.run(main())) is TimeoutError
    assert cancelled == [True]


def test_a_cancel_from_outside_stays_a_cancel(path: str) -> None:
    """Shutdown cancels a handler waiting in a read: that must not read as the idle timeout."""

    async def main() -> str:
        task = asyncio.ensure_future(within(asyncio.sleep(60), 30.0))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except TimeoutError:
            return "timeout"
        return "finished"

    assert asyncio.run(main()) == "cancelled"
