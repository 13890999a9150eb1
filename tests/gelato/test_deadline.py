"""`gelato.deadline.within`: the value, or the builtin TimeoutError with the awaitable cancelled."""

from __future__ import annotations

import asyncio

from gelato.deadline import within


def test_returns_the_value_within_the_limit() -> None:
    async def answer() -> int:
        await asyncio.sleep(0.001)
        return 42

    async def main() -> tuple[int, int]:
        return await within(answer(), 5.0), await within(answer(), None)

    assert asyncio.run(main()) == (42, 42)


def test_past_the_limit_raises_the_builtin_timeout_and_cancels() -> None:
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


def test_a_cancel_from_outside_stays_a_cancel() -> None:
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
