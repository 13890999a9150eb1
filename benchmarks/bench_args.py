"""`gelato-bench gsm8k`'s options checked before anything starts: the comma lists parsed as the run
will parse them, the plan's own rules (an option the plan would drop is refused, not recorded as
used), and the default policy list.

Contract: `check_args(args)` returns '' or the one-line usage error `main` reports (exit 2); pure,
no I/O but matplotlib's availability (`plots_unavailable`).
"""

from __future__ import annotations

import argparse
import math

from gelato.benchmarks.bench_plots import plots_unavailable
from gelato.device.policy_options import PIPELINE_MODES

FIXED = [f"fixed-{k}" for k in range(9)]
BUDGET_FACTORS = "1.0,1.25"
DEFAULT_POLICIES = ",".join(["ar-edge", "ar-device", *FIXED, "heuristic", "entropy", "adaedl", "lyapunov", "gelato"])


PIPELINE_ALIASES = {"both": ("off", "local"), "all": PIPELINE_MODES}


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def pipeline_modes(text: str) -> list[str]:
    """`--pipeline`: a comma list of modes (off, local, send-ahead) and aliases (both, all), in
    order, each once. ValueError on anything else or nothing."""
    modes: list[str] = []
    for part in (x.strip() for x in text.split(",")):
        for mode in PIPELINE_ALIASES.get(part, (part,)) if part else ():
            if mode not in PIPELINE_MODES:
                names = ", ".join([*PIPELINE_MODES, *PIPELINE_ALIASES])
                raise ValueError(f"--pipeline: unknown mode {mode!r} (one or more of {names})")
            if mode not in modes:
                modes.append(mode)
    if not modes:
        raise ValueError("--pipeline: no mode given")
    return modes


def check_lists(args: argparse.Namespace) -> str:
    """The comma-list options, parsed as the run will parse them (a typo is an error before any
    channel or edge starts, not a traceback later); '' when all are well-formed."""
    for flag, text in (
        ("--budgets", args.budgets),
        ("--budget-factors", args.budget_factors),
        ("--v", args.v),
        ("--entropy-thresholds", args.entropy_thresholds),
        ("--adaedl-lambdas", args.adaedl_lambdas),
    ):
        try:
            values = floats(text)
        except ValueError:
            return f"{flag}: expected a comma list of numbers, got {text!r}"
        if not all(math.isfinite(v) for v in values):
            return f"{flag}: values must be finite, got {text!r}"
    from gelato.device.policy import parse_policy

    for name in (p.strip() for p in args.policies.split(",") if p.strip()):
        try:
            parse_policy(name)
        except ValueError as exc:
            return f"--policies: {exc}"
    from gelato.power import RADIOS
    from gelato.power.cpu_model import PROFILES as DEVICE_PROFILES

    if args.radio is not None and args.radio not in (*RADIOS, "none"):
        return f"--radio: unknown radio {args.radio!r} (one of {', '.join((*RADIOS, 'none'))})"
    if args.device_profile not in DEVICE_PROFILES:
        return f"--device-profile: unknown profile {args.device_profile!r} (one of {', '.join(DEVICE_PROFILES)})"
    if args.budgets and args.budget_factors != BUDGET_FACTORS:
        return "--budgets and --budget-factors exclude each other (factors scale the cheapest fixed-K's J/token)"
    return ""


def check_plan(args: argparse.Namespace) -> str:
    """Options the plan would drop without a word (and the recorded command would still claim):
    refused, as gelato-device refuses settings it would ignore; '' when each is used."""
    selected = [p.strip() for p in args.policies.split(",") if p.strip()]
    controllers = [p for p in selected if p in ("lyapunov", "gelato")]
    drafting_fixed = [p for p in selected if p.startswith("fixed-") and p != "fixed-0"]
    budgeted = controllers and (args.budgets or (floats(args.budget_factors) and drafting_fixed))
    if controllers and not args.budgets and floats(args.budget_factors) and not drafting_fixed:
        return (
            "--budget-factors scales the cheapest fixed-K's J/token, and --policies has no fixed-K with K >= 1: "
            "add one, give --budgets (J/token), or --budget-factors '' for no budgeted runs"
        )
    if args.v and not budgeted:
        return "--v: V applies to the budgeted lyapunov/gelato runs, and this plan has none"
    if args.ahead_blocks is not None and not (controllers and "send-ahead" in pipeline_modes(args.pipeline)):
        return "--ahead-blocks: only lyapunov/gelato runs with --pipeline send-ahead use it, and this plan has none"
    return ""


def check_args(args: argparse.Namespace) -> str:
    listed = check_lists(args)
    if listed:
        return listed
    no_plots_here = plots_unavailable(args.no_plots)
    bad = [
        ("--devices must be >= 1", args.devices >= 1),
        ("--limit must be >= --devices", args.limit >= args.devices),
        ("--max-new-tokens must be >= 2", args.max_new_tokens >= 2),
        ("--k-max must be >= 1", args.k_max >= 1),
        ("budgets must be > 0", all(b > 0 for b in floats(args.budgets or args.budget_factors))),
        ("--ahead-blocks must be >= 1", args.ahead_blocks is None or args.ahead_blocks >= 1),
        (no_plots_here, not no_plots_here),
    ]
    try:
        pipeline_modes(args.pipeline)
    except ValueError as exc:
        return str(exc)
    return next((m for m, ok in bad if not ok), "") or check_plan(args)
