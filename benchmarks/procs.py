"""Starting `gelato-edge` and `gelato-device` as real OS processes (benchmarks and demo).

Contract: `start_edge(args)` returns an `Edge` once its `listening on HOST:PORT` line appeared
(or raises with the edge's output); `Edge.stop()` sends SIGTERM and waits. `run_device(args)`
runs one `gelato-device --json` and returns its per-prompt records. `machine()` describes the
machine for results files (CPU model, cores, torch, GPU when present).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name(0)}"
    return desc


@dataclass
class Edge:
    proc: subprocess.Popen[str]
    address: str

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_edge(args: list[str], timeout_s: float = 180.0, prefix: list[str] | None = None) -> Edge:
    """`prefix` runs the edge under a launcher, e.g. `taskset -c 0` to pin it to a core."""
    cmd = [*(prefix or []), sys.executable, "-m", "edge.cli", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on ([\w.\-\[\]:]+):(\d+)", line)
        if m:
            return Edge(proc, f"{m.group(1)}:{m.group(2)}")
    proc.kill()
    raise RuntimeError("gelato-edge did not start:\n" + "".join(lines))


def run_device(args: list[str], timeout_s: float = 900.0) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "device.cli", "--json", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(f"gelato-device failed ({res.returncode}):\n{res.stderr}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
