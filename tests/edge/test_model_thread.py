"""The edge's model thread (edge/model_thread.py) knows when no job is left: shutdown asks it, to
exit without waiting for a forward that outlived the drain but not for nothing."""

from __future__ import annotations

import asyncio
import threading

from gelato.edge.model_thread import ModelThread


def test_idle_after_jobs_ran_failed_or_were_cancelled_before_they_started() -> None:
    thread = ModelThread()
    try:
        release = threading.Event()
        running = thread.submit(release.wait)
        queued = thread.submit(lambda: None)
        failing = thread.submit(lambda: 1 / 0)
        assert not thread.wait_idle(0.05)  # one runs, two wait
        assert queued.cancel()  # cancelled before it started: it never runs
        release.set()
        assert running.result(5) and thread.wait_idle(5)
        assert isinstance(failing.exception(5), ZeroDivisionError)

        async def cancelled_caller() -> None:
            """An asyncio caller cancelled while its job waits behind another (a device gone
            while its prefill piece queues): `run_in_executor` cancels that job too."""
            block = threading.Event()
            loop = asyncio.get_running_loop()
            first = loop.run_in_executor(thread, block.wait)
            second = loop.run_in_executor(thread, lambda: None)
            second.cancel()
            await asyncio.sleep(0.05)
            block.set()
            await first

        asyncio.run(cancelled_caller())
        assert thread.wait_idle(5)
    finally:
        thread.shutdown()
