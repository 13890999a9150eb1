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
those tails and would have decided otherwise; a run recorded at a commit that already charges the
tails as now (found from the checkout's git history) is left as recorded.

The radio's connected state between a generation's transfers, charged since a later change, is
not added: runs recorded before it lack it, recomputed or not (the README says by how much).

`python -m gelato.benchmarks.tail_recompute benchmarks/results/gsm8k_lte_n8` prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gelato.power import radio_profile

ROOT = Path(__file__).resolve().parents[1]
# The commits that changed what a run is charged: from TAIL_FIX on, a question's tail is cut short
# by the next one (each device keeps one whole tail); from AR_DEVICE_FIX on, ar-device (no traffic)
# is charged no tail at all.
TAIL_FIX, AR_DEVICE_FIX = "026896b", "9522061"


def charged_tails(
    commit: str, repo: Path = ROOT, fixes: tuple[str, str] = (TAIL_FIX, AR_DEVICE_FIX)
) -> tuple[bool, bool]:
    """For a run recorded at `commit`: (every question was charged a whole tail, ar-device was
    too), from `repo`'s history. ValueError when that history cannot tell (a shallow clone, a
    commit from elsewhere): a recomputation of a run charged as now would take out tails it never
    had."""

    def before(fix: str) -> bool:
        try:
            res = subprocess.run(
                ["git", "-C", str(repo), "merge-base", "--is-ancestor", fix, commit], capture_output=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ValueError(f"cannot read the history of {repo}: {exc}") from exc
        if res.returncode not in (0, 1):
            raise ValueError(f"this checkout's history cannot tell whether {commit} has {fix} (fetch the full history)")
        return res.returncode == 1

    return before(fixes[0]), before(fixes[1])


def recompute(summary: dict[str, Any], per_question: bool = True, ar_device: bool = True) -> list[dict[str, Any]]:
    """One row per unbudgeted run with a recorded energy: label, recorded and recomputed J/token.
    `per_question`, `ar_device`: what the run was charged (`charged_tails`); nothing to take out
    of a run that was charged as now."""
    radio = radio_profile(summary["settings"].get("radio") or "wifi")
    tail_j = radio.tail_energy_j() if radio is not None else 0.0
    rows = []
    for run in summary["runs"] if per_question else []:
        if run.get("budget_j_per_token") or run.get("energy_j_per_token") is None or not run.get("tokens"):
            continue
        devices = sum(1 for d in run.get("per_device") or [{}] if d.get("questions", 1) > 0)
        kept = devices  # one tail per device (its last question's)
        if run["policy"] == "ar-device":  # sends nothing: no tail now; charged one per question, or none
            kept = 0 if ar_device else run["questions"]
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
    commit = (summary.get("code_at_end") or {}).get("commit")
    if not commit:
        p.error(f"{path} names no commit (code_at_end): cannot tell which tails its runs were charged")
    try:
        per_question, ar_device = charged_tails(commit)
    except ValueError as exc:
        p.error(str(exc))
    if not per_question:
        print(f"{args.folder}: recorded at {commit[:12]}, which charges the radio tail as now: nothing to recompute")
        return 0
    print(f"{args.folder}: radio {summary['settings'].get('radio')}, estimated energy recomputed (see --help)")
    print("(the tails only: the radio's connected state between transfers, charged since, is not added)")
    print("| run | recorded mJ/token | tails as charged now, mJ/token | tails removed |")
    print("|---|---:|---:|---:|")
    for r in recompute(summary, per_question, ar_device):
        print(
            f"| {r['label']} | {r['recorded_j_per_token'] * 1e3:.1f} | {r['j_per_token'] * 1e3:.1f} | "
            f"{r['tails_removed']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
