"""The NVML meter against a known GPU load: energy ≈ mean power × time.

Contract: `python -m gelato.benchmarks.nvml_check [--seconds 5] [--index 0] [--tolerance 0.10]
[--out FILE.json]` measures, on GPU `index`, an idle window and a load window (a loop of bf16
8192×8192 matrix products, started 2 s before its window so the window sees steady state). For
each window it reports the `NvmlMeter`'s energy (the driver's total-energy counter, extrapolated
between its ticks) and an independent reference: the meter's instantaneous power sampled every
10 ms on a thread, mean × wall time; their ratio; and how often the counter ticked. Exit status:
0 when both windows agree within the tolerance, 1 when one does not, 2 when there is no NVML GPU
(nothing is measured then, and nothing is written).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gelato.power.base import MeterUnavailable
from gelato.power.nvml import NvmlMeter

Load = Callable[[threading.Event], None]


def window(meter: NvmlMeter, seconds: float, interval_s: float = 0.01) -> dict[str, Any]:
    """Meter energy over `seconds` vs sampled power × time, with the counter's ticks counted."""
    samples: list[float] = []
    ticks: list[float] = []
    stop = threading.Event()

    has_counter = meter.integrator is None

    def sample() -> None:
        last = meter._counter_mj() if has_counter else 0
        while not stop.is_set():
            samples.append(meter.power_w())
            if has_counter and (c := meter._counter_mj()) != last:
                ticks.append(time.monotonic())
                last = c
            stop.wait(interval_s)

    start = meter.read()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(seconds)
    end = meter.read()
    stop.set()
    sampler.join()
    wall_s = end.t_s - start.t_s
    meter_j = end.since(start)
    mean_w = statistics.fmean(samples)
    periods = [b - a for a, b in itertools.pairwise(ticks)]
    return {
        "wall_s": round(wall_s, 3),
        "meter_j": round(meter_j, 2),
        "meter_mean_w": round(meter_j / wall_s, 1),
        "sampled_mean_w": round(mean_w, 1),
        "reference_j": round(mean_w * wall_s, 2),
        "ratio": round(meter_j / (mean_w * wall_s), 4),
        "power_samples": len(samples),
        "counter_tick_ms_median": round(statistics.median(periods) * 1e3, 1) if periods else None,
    }


def matmul_load(index: int) -> Load:
    """A load that keeps GPU `index` busy with bf16 matrix products until told to stop."""
    import torch

    dev = torch.device("cuda", index)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def run(stop: threading.Event) -> None:
        while not stop.is_set():
            for _ in range(20):
                torch.matmul(a, b)
            torch.cuda.synchronize(dev)

    return run


def check(meter: NvmlMeter, load: Load, seconds: float, warmup_s: float = 2.0) -> dict[str, Any]:
    idle = window(meter, seconds)
    stop = threading.Event()
    worker = threading.Thread(target=load, args=(stop,), daemon=True)
    worker.start()
    try:
        time.sleep(warmup_s)
        busy = window(meter, seconds)
    finally:
        stop.set()
        worker.join()
    return {"gpu": str(meter.name), "idle": idle, "load": busy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nvml_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        meter = NvmlMeter(args.index)
    except MeterUnavailable as exc:
        print(f"nvml_check: no NVML GPU to measure: {exc}", file=sys.stderr)
        return 2
    try:
        if meter.integrator is not None:
            print("nvml_check: this GPU has no energy counter; the meter integrates power", file=sys.stderr)
        report = check(meter, matmul_load(args.index), args.seconds)
    finally:
        meter.close()
    ok = all(abs(report[w]["ratio"] - 1) <= args.tolerance for w in ("idle", "load"))
    report.update(
        tolerance=args.tolerance,
        within_tolerance=ok,
        command=" ".join(["nvml_check", *(sys.argv[1:] if argv is None else argv)]),
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
