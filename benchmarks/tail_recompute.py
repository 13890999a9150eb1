"""Device J/token of a recorded `gelato-bench gsm8k` run as the radio tail is charged now.

Contract: `recompute(summary)` takes a run folder's `summary.json` (as a dict) and returns, for
every run without an energy budget, the recorded device J/token and the J/token with the radio's
tail charged as `gelato.device.energy.EnergyAccountant` charges it since the tail fix: runs
recorded before it charged each question a whole tail (12.3 J on LTE), although each device
started its next question at once, cutting the tail short. Recomputed here: every device keeps
one whole tail (its last question's) and the tails between its questions are taken out whole,
the gaps between a device's questions (milliseconds: the device starts the next at once) being
neglected; `ar-device`, which sends nothing, keeps none. A recomputation from the recorded
totals, not a measurement: runs with a budget are left out, since their controller was charged
those tails and would have decided otherwise.

`python -m gelato.benchmarks.tail_recompute benchmarks/results/gsm8k_lte_n1` prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gelato.power import radio_profile


def recompute(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per unbudgeted run with a recorded energy: label, recorded and recomputed J/token."""
    radio = radio_profile(summary["settings"].get("radio") or "wifi")
    tail_j = radio.tail_energy_j() if radio is not None else 0.0
    rows = []
    for run in summary["runs"]:
        if run.get("budget_j_per_token") or run.get("energy_j_per_token") is None or not run.get("tokens"):
            continue
        devices = sum(1 for d in run.get("per_device") or [{}] if d.get("questions", 1) > 0)
        kept = 0 if run["policy"] == "ar-device" else devices  # a tail per device, none without traffic
        removed_j = (run["questions"] - kept) * tail_j
        total_j = run["energy_j_per_token"] * run["tokens"]
        rows.append(
            {
                "label": run["label"],
                "recorded_j_per_token": run["energy_j_per_token"],
                "j_per_token": (total_j - removed_j) / run["tokens"],
                "tails_removed": run["questions"] - kept,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tail_recompute", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a gelato-bench gsm8k output folder (holding summary.json)")
    args = p.parse_args(argv)
    path = args.folder / "summary.json"
    if not path.is_file():
        p.error(f"{path}: no such file")
    summary = json.loads(path.read_text())
    print(f"{args.folder}: radio {summary['settings'].get('radio')}, estimated energy recomputed (see --help)")
    print("| run | recorded mJ/token | tails as charged now, mJ/token | tails removed |")
    print("|---|---:|---:|---:|")
    for r in recompute(summary):
        print(
            f"| {r['label']} | {r['recorded_j_per_token'] * 1e3:.1f} | {r['j_per_token'] * 1e3:.1f} | "
            f"{r['tails_removed']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
