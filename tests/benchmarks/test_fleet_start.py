"""A fleet interrupted while it starts its devices (SIGTERM arrives as SystemExit under the
benchmark's `guard`) kills the devices already started: they were in no list yet, the run's
cleanup never saw them, and they outlived the benchmark inside namespaces it then deleted by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gelato.benchmarks.bench_run import Fleet, RunSpec


def test_devices_started_before_an_interrupt_are_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[str]] = []

    def start(self: Fleet, cmd: list[str], err: Path, d: int, lines: Any) -> subprocess.Popen[str]:
        if d == 2:
            raise SystemExit(143)  # the signal lands while the third device starts
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], text=True)
        started.append(proc)
        return proc

    monkeypatch.setattr(Fleet, "_start", start)
    fleet = Fleet([[]] * 3, ["--edge", "h:1"], [tmp_path / f"d{d}.jsonl" for d in range(3)], tmp_path)
    try:
        with pytest.raises(SystemExit):
            fleet.run(RunSpec("fixed-2", "fixed-2", "fixed"))
        assert len(started) == 2 and all(p.poll() is not None for p in started)
    finally:
        for p in started:
            p.kill()
            p.wait()
