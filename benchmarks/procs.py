"""Starting `gelato-edge` and `gelato-device` as real OS processes (benchmarks and demo).

Contract: `start_edge(args)` returns an `Edge` once its `listening on HOST:PORT` line appeared
(or raises with the edge's output); `Edge.stop()` sends SIGTERM and waits. `run_device(args)`
runs one `gelato-device --json` and returns its per-prompt records. `machine()` describes the
machine for results files (CPU model, cores, torch, GPU when present). `thread_cpu_s(pid)` is an
edge process's CPU seconds so far by thread: its model thread, its event loop (the main thread) and
the rest (gRPC's threads), from /proc (Linux; empty elsewhere). `check_energy_source` holds a
benchmark's energy note (written from the flags its devices got) to what each run recorded.
`exit_on_signals()` turns SIGTERM and SIGHUP into SystemExit while it is open, so that the
`finally` blocks stopping the edge run (`timeout`, a CI job cancelled, a closed terminal).
`child_env()` is the environment every process a benchmark starts gets: the caller's, less every
`GELATO_DEVICE_*` / `GELATO_EDGE_*` setting (`gelato-device` and `gelato-edge` read each flag from
one), so the command line a benchmark records is the whole configuration of its runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

CHILD_ENV_PREFIXES = ("GELATO_DEVICE_", "GELATO_EDGE_")
_reported: set[str] = set()  # the dropped names already reported on stderr (once per process)


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a benchmark's child processes: `environ` (default: this process's) less
    every `GELATO_DEVICE_*` and `GELATO_EDGE_*` variable, everything else kept (GELATO_TORCH, PATH,
    CUDA_VISIBLE_DEVICES, ...). A `GELATO_DEVICE_PIPELINE=local` in the caller's shell would
    otherwise change runs the benchmark records as something else. The first time a name is
    dropped from this process's own environment, one line on stderr says so."""
    env = dict(os.environ if environ is None else environ)
    dropped = sorted(k for k in env if k.startswith(CHILD_ENV_PREFIXES))
    for k in dropped:
        del env[k]
    if environ is None and not _reported.issuperset(dropped):
        _reported.update(dropped)
        note = f"ignoring {', '.join(dropped)}: a benchmark's runs are set by its own flags"
        print(note, file=sys.stderr, flush=True)
    return env


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) while open, unless ignored already (the
    handlers before are put back after): Python's default for them ends the process at once, skipping every `finally`,
    and an edge started by then would go on running, its model loaded, with nobody to stop it."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    # A signal ignored already stays ignored (`nohup` ignores SIGHUP: a closed terminal must not end the run).
    caught = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, on_signal) for s in caught}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def pin_to_one_cpu() -> str:
    """Pin this process to the last CPU it may use, where the OS has CPU affinity (Linux); what
    was done, for a result's header: "CPU N" or "not pinned (no CPU affinity on this OS)"."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no CPU affinity on this OS)"
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"CPU {cpu}"


class Edge:
    """A running `gelato-edge`. A daemon thread keeps reading its output for its whole life: an
    unread pipe fills after ~64 KiB of log lines and would then block the edge mid-benchmark. The
    last 500 lines stay available for error messages."""

    def __init__(
        self,
        args: list[str],
        timeout_s: float = 180.0,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`env`: the process's environment (default `child_env()`: a benchmark's flags are its
        whole configuration; tests of the `GELATO_EDGE_*` variables pass their own)."""
        cmd = [*(prefix or []), sys.executable, "-m", "gelato.edge.cli", "--port", "0", *args]
        env = child_env() if env is None else env
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.address = ""
        self._lines: deque[str] = deque(maxlen=500)
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._drain, name="edge-output", daemon=True)
        try:
            self._reader.start()
            started = self._listening.wait(timeout_s) and bool(self.address)
        except BaseException:  # SIGTERM (SystemExit) or Ctrl-C while it starts: not left running
            stop_process(self.proc, 15)
            raise
        if not started:
            self.proc.kill()
            self.stop()
            raise RuntimeError("gelato-edge did not start:\n" + self.output())

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)
            m = None if self.address else re.search(r"listening on ([\w.\-\[\]:]+):(\d+)", line)
            if m:
                self.address = f"{m.group(1)}:{m.group(2)}"
                self._listening.set()
        self._listening.set()  # output ended: wake a waiter, which then sees no address

    def output(self) -> str:
        return "".join(list(self._lines))

    def stop(self) -> int:
        stop_process(self.proc, 15)
        self._reader.join(timeout=5)
        return self.proc.returncode


def stop_process(proc: subprocess.Popen[str], grace_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s`; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_edge(args: list[str], timeout_s: float = 180.0, prefix: list[str] | None = None) -> Edge:
    """`prefix` runs the edge under a launcher, e.g. `taskset -c 0` to pin it to a core. Raises
    with the edge's output if it exits or stays silent for `timeout_s` before listening."""
    return Edge(args, timeout_s, prefix)


def run_device(args: list[str], timeout_s: float = 900.0) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "gelato.device.cli", "--json", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env())
    if res.returncode != 0:
        raise RuntimeError(f"gelato-device failed ({res.returncode}):\n{res.stderr}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def thread_cpu_s(pid: int, model_thread: str | None = None) -> dict[str, float]:
    """CPU seconds (user + system) process `pid` used so far: "model" (the thread the OS calls
    `model_thread`, by default the edge's `gelato.edge.model_thread.MODEL_THREAD_NAME`), "loop" (the main
    thread: the edge runs its event loop there) and "other" (the rest of the process, threads that
    ended included: gRPC's). In clock ticks (10 ms on Linux): meant for runs of seconds. Empty when
    /proc cannot be read."""
    if model_thread is None:
        from gelato.edge.model_thread import MODEL_THREAD_NAME

        model_thread = MODEL_THREAD_NAME
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path: str) -> tuple[str, int]:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        fields = raw[raw.rindex(")") + 2 :].split()  # from field 3 (state) on: utime, stime are 14, 15
        return raw[raw.index("(") + 1 : raw.rindex(")")], int(fields[11]) + int(fields[12])

    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    ticks = {"model": 0, "loop": 0}
    for tid in tids:
        try:
            name, n = stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile: "other" still counts it
            continue
        if tid == str(pid):
            ticks["loop"] += n
        elif name == model_thread:
            ticks["model"] += n
    try:
        total = stat(f"/proc/{pid}/stat")[1]  # read last: the threads' ticks are all in it
    except OSError:
        return {}
    ticks["other"] = max(0, total - ticks["model"] - ticks["loop"])
    return {kind: n / tick for kind, n in ticks.items()}


ESTIMATED = "cpu-model (estimated)"  # what every device run here is told to use (`--meter cpu-model`)


def check_energy_source(label: str, sources: list[str]) -> None:
    """The energy note is written from the flags the devices were given; this holds it to what each
    run recorded (a device that measured with another meter, or fell back to one, stops the run)."""
    if sources != [ESTIMATED]:
        raise RuntimeError(f"{label}: device energy sources {sources}, expected only {ESTIMATED}")


def unique_label(label: str, seen: dict[str, int]) -> str:
    """`label`, or `label (n)` when n - 1 runs took it already (two ē that format alike, a τ
    listed twice): a run's label names its trace and rounds files and keys its records, so two
    runs under one label overwrote each other's files and were merged on rebuild."""
    seen[label] = seen.get(label, 0) + 1
    return label if seen[label] == 1 else f"{label} ({seen[label]})"
