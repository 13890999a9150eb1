"""`gelato-energy probe [--json] [--seconds 1]`: which meters exist here, and a reading of each.

Contract: for every source (nvml, rapl, jetson, cpu-model) prints whether it can read, why not,
and over the window its joules and mean watts (null, with the reason, when a meter that opened
could not be read), with `measured`/`estimated` labels. Exit 0 even
when nothing measures: the cpu-model estimate is always there, and labelled so.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from gelato.power import SOURCES, MeterUnavailable, open_source
from gelato.power.cpu_model import PROFILES


def probe(seconds: float, profile: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    meters = []
    for source in SOURCES:
        try:
            meters.append(open_source(source, profile))
        except MeterUnavailable as exc:
            rows.append({"source": source, "available": False, "reason": str(exc)})
    starts = [m.read() for m in meters]
    time.sleep(seconds)
    for meter, start in zip(meters, starts, strict=True):
        end = meter.read()
        joules = end.since(start)
        row = {
            "source": meter.source,
            "available": True,
            "kind": meter.kind,
            "joules": round(joules, 6),
            "mean_w": round(joules / (end.t_s - start.t_s), 4),
            "window_s": round(end.t_s - start.t_s, 3),
        }
        if not math.isfinite(joules):  # null in JSON (a bare NaN is not JSON), and said why
            why = "no reading over the window (the sensor failed to read, or its counter restarted: see the log)"
            row.update(joules=None, mean_w=None, reason=why)
        if meter.source == "cpu-model":  # an estimate is only as good as the profile it assumes
            row["device_profile"] = profile
        rows.append(row)
        meter.close()
    order = {s: i for i, s in enumerate(SOURCES)}
    return sorted(rows, key=lambda r: order[r["source"]])


def _window_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600 seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gelato-energy", description="GELATO energy meters")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="list meters and take a short reading of each")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--seconds", type=_window_s, default=1.0, help="reading window, > 0 and <= 3600 (default 1)")
    pr.add_argument("--device-profile", default="phone", choices=sorted(PROFILES), help="for the cpu-model estimate")
    args = p.parse_args(argv)
    rows = probe(args.seconds, args.device_profile)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if r["available"] and r["joules"] is None:
            print(f"{r['source']:10s} {r['kind']:9s} {r['reason']}")
        elif r["available"]:
            line = f"{r['source']:10s} {r['kind']:9s} {r['joules']:.4f} J over {r['window_s']} s = {r['mean_w']:.3f} W"
            print(line + (f" (profile {r['device_profile']})" if "device_profile" in r else ""))
        else:
            print(f"{r['source']:10s} unavailable: {r['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
