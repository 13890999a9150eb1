"""The edge's model thread: the one thread every target forward runs on.

Contract: `ModelThread()` is a one-worker executor whose thread carries `MODEL_THREAD_NAME` at the
OS level (`top -H`, `ps -L`, /proc/PID/task/TID/comm), so that its CPU time can be told from the
event loop's and gRPC's. It counts the jobs submitted and not yet finished (`jobs()`: a job that
runs long, such as a streamed session's steps, yields to any other): `wait_idle(timeout_s)` says
whether none is left, which shutdown asks because the interpreter joins this thread at exit,
whatever it is doing (a long prefill would otherwise hold the process past its stop timeout).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

_R = TypeVar("_R")
# Linux keeps at most 15 characters of a thread's name.
MODEL_THREAD_NAME = "gelato-model"


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` at the OS level (Linux `prctl(PR_SET_NAME)`); elsewhere, or
    if it fails, nothing: the name is for operators and benchmarks, not for correctness."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME


class ModelThread(ThreadPoolExecutor):
    """One worker named `MODEL_THREAD_NAME`; `wait_idle` (module docstring)."""

    def __init__(self) -> None:
        super().__init__(
            max_workers=1, thread_name_prefix="target", initializer=name_os_thread, initargs=(MODEL_THREAD_NAME,)
        )
        self._jobs = 0  # submitted, not finished
        self._idle = threading.Condition()

    def submit(self, fn: Callable[..., _R], /, *args: Any, **kwargs: Any) -> Future[_R]:
        with self._idle:
            self._jobs += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:  # shut down already: the job never runs
            self._done()
            raise
        # Done when it ran, and also when it was cancelled before it started (an asyncio caller
        # cancelled: `run_in_executor` cancels the job too, and a cancelled job never runs).
        future.add_done_callback(lambda _: self._done())
        return future

    def _done(self) -> None:
        with self._idle:
            self._jobs -= 1
            self._idle.notify_all()

    def jobs(self) -> int:
        """Jobs submitted and not finished (the one running included)."""
        return self._jobs

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every job submitted has finished, waiting up to `timeout_s` for it."""
        with self._idle:
            return self._idle.wait_for(lambda: self._jobs == 0, timeout_s)
