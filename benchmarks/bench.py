"""`gelato-bench gsm8k`: every draft policy on GSM8K between two emulated hosts.

Contract. `gelato-bench gsm8k [--devices N] [--policies LIST] [--budgets J,...] [--v V,...] [--limit
50] [--data PATH] [--drafter M --target M] [--max-new-tokens 256] [--out DIR [--force]] [--channel
none|wifi|lte|lossy] [--one-way-ms --jitter-ms --up-mbit --down-mbit --loss --loss-stall-ms]` builds
the channel (`gelato.benchmarks.channel`: two network namespaces + veth, tbf rates,
delay/jitter/loss by netem or the userspace relay; measured RTT and rates next to the nominal ones,
before and after the runs, and the relay's realised loss), starts one `gelato-edge` in the edge
namespace (pinned to the first CPU), and runs each configuration as N concurrent `gelato-device`
processes in the device namespace (pinned to the other CPUs, one each where there are enough), the
first `--limit` test questions dealt round-robin over the devices. Order: `ar-edge` (the reference
every edge-verified output must equal), fixed-K, `ar-device`, heuristic, entropy (each τ), adaedl
(each λ), lyapunov and gelato (without budget), then lyapunov and gelato at every budget ē × V
(default ē: the cheapest fixed-K J/token × `--budget-factors`). Each lyapunov/gelato configuration
runs once per pipelining mode of `--pipeline` (a comma list of off, local, send-ahead; `both` =
off,local, `all` = every mode, the default; `--ahead-blocks N` for send-ahead, else the device's
default), labelled `gelato+local`, `gelato+send-ahead ē=… V=…`, ... (plain `gelato` is off).
After the device runs: transformers assisted generation with the same pair in this process
(`gelato.benchmarks.bench_refs.assisted`) and the oracle bound from this run's verdicts and costs.

Outputs under `--out`: `summary.json` (settings, machine, pinning, channel with mechanisms and
measurements, every run's metrics with per-device rows and per-question records without token ids,
references, targets), `table.md`, `rounds/<run>.jsonl.gz` (one JSON line per round: the device's
`--trace` fields plus `device` and `question`), `outputs.jsonl.gz` (every device record with its
token ids and text) and PNG plots (`gelato.benchmarks.bench_plots`); an `--out` that already holds a
run is refused without `--force` (the default folders are the committed results). The command
recorded there (`reproduce_command`) spells out every run-shaping option at the value it resolved to,
defaults included, so it makes the same runs under later defaults. Device and edge processes start
without the caller's `GELATO_DEVICE_*` / `GELATO_EDGE_*` variables (`procs.child_env`). `gelato-bench
report DIR [--data FILE]` rebuilds all of it from those files (no device runs; the oracle is
recomputed, the assisted row kept unless `--rerun-assisted`). Every list option and policy name is
checked before anything starts. Exit status 0; 1 when an edge-verified output differs from
ar-edge's (losslessness) or a device failed; 2 on bad arguments or when the channel cannot be built
(e.g. not root: never a silent fallback); 130 on Ctrl-C, 143/129 on SIGTERM/SIGHUP (the finished
configurations kept in `partial/`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gelato.benchmarks.bench_args import (
    BUDGET_FACTORS,
    DEFAULT_POLICIES,
    check_args,
    floats,
    pipeline_modes,
)
from gelato.benchmarks.bench_files import foreign_files, keep_partial
from gelato.benchmarks.bench_plots import plots_unavailable
from gelato.benchmarks.bench_run import (
    DataError,
    Fleet,
    RunResult,
    RunSpec,
    load_questions,
    shard_files,
    summarize,
)
from gelato.benchmarks.channel import PROFILES, Channel, ChannelError, Profile, guard, profile_from
from gelato.benchmarks.procs import check_energy_source, exit_on_signals, unique_label

ENERGY_NOTE = (
    "Device energy is an ESTIMATE: the cpu-model meter (`{profile}` profile: CPU seconds × active W + idle W × wall "
    "time){radio_part}; no power was measured."
)


def energy_note(profile: str, radio: str, rates_mbit: tuple[float, float] = (0.0, 0.0)) -> str:
    """ENERGY_NOTE for the devices' profile and radio (`--radio none`: no radio energy was added);
    `rates_mbit`: the link rates the radio model was given (0: its own)."""
    at = f" at the channel's {rates_mbit[0]:g}/{rates_mbit[1]:g} Mbit/s" if any(rates_mbit) else ""
    part = (
        " and no radio model"
        if radio == "none"
        else f" plus the `{radio}` radio model{at} from bytes (Huang et al. 2012)"
    )
    return ENERGY_NOTE.format(profile=profile, radio_part=part)


def radio_rates(profile: Profile, radio: str) -> tuple[float, float]:
    """The link rates the devices' radio model gets (`gelato-device --radio-up-mbit/--radio-down-mbit`):
    the channel's own, where it limits them, so that a `--up-mbit` given here reaches the radio's
    transfer time and power too; 0 (the radio model's own rate) where the channel sets none."""
    return (0.0, 0.0) if radio == "none" else (profile.up_mbit, profile.down_mbit)


# Both processes on the CPU in float32, whatever the host has: the references (oracle verdicts,
# assisted generation) are computed so, outputs are checked against them token for token, and the
# cpu-model estimate counts CPU time only (`auto` would put a CUDA host's drafter on its GPU).
CPU_FLOAT32 = ("--device", "cpu", "--dtype", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato-bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gsm8k", help="throughput/energy of every policy on GSM8K over an emulated channel")
    g.add_argument("--devices", type=int, default=1, help="concurrent device processes (default 1)")
    g.add_argument("--policies", default=DEFAULT_POLICIES, help="comma list (ar-edge always runs: the reference)")
    g.add_argument("--budgets", default="", help="ē in J/token for lyapunov/gelato (default: from fixed-K)")
    g.add_argument("--budget-factors", default=BUDGET_FACTORS, help="× the cheapest fixed-K J/token, without --budgets")
    g.add_argument("--v", default="", help="V values for the budgeted runs (default: gelato-device's)")
    g.add_argument(
        "--pipeline",
        default="all",
        help="lyapunov/gelato pipelining modes, comma list of off, local, send-ahead (both = off,local; "
        "all = every mode; default all): each configuration runs once per mode",
    )
    g.add_argument(
        "--ahead-blocks", type=int, default=None, help="send-ahead runs: blocks in flight past the awaited one"
    )
    g.add_argument("--k-max", type=int, default=8, help="cap of every adaptive policy (default 8, the fixed-K range)")
    g.add_argument("--entropy-thresholds", default="1", help="τ values (nats) of the entropy policy")
    g.add_argument("--adaedl-lambdas", default="0.6", help="λ values of adaedl")
    g.add_argument("--limit", type=int, default=50, help="the first N test questions (default 50)")
    g.add_argument(
        "--data",
        type=Path,
        default=None,
        help="GSM8K test JSONL (default: $GELATO_GSM8K_DIR/test.jsonl, else shared/data/gsm8k/test.jsonl "
        "in the folder holding the repository checkout)",
    )
    g.add_argument(
        "--instruction",
        default="",
        help="text added to every question after a blank line, for an instruct model, e.g. 'Please reason step by "
        "step, and put your final answer within \\boxed{}.' (default none: the built-in pair answers '#### N')",
    )
    g.add_argument("--drafter", default=None, help="default: the built-in tiny drafter")
    g.add_argument("--target", default=None, help="default: the built-in tiny target")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gsm8k_<channel>_n<N>")
    g.add_argument("--force", action="store_true", help="write into an --out folder that already holds a run")
    g.add_argument("--channel", choices=sorted(PROFILES), default="wifi")
    for flag, unit in (("one-way-ms", "ms"), ("jitter-ms", "ms ±"), ("up-mbit", "Mbit/s"), ("down-mbit", "Mbit/s")):
        g.add_argument(f"--{flag}", type=float, default=None, help=f"override the profile's {flag} ({unit})")
    g.add_argument("--loss", type=float, default=None, help="override the per-segment loss probability")
    g.add_argument("--loss-stall-ms", type=float, default=None, help="stall per lost segment (relay; default 200)")
    g.add_argument("--delay-mechanism", choices=["auto", "proxy", "netem"], default="auto")
    g.add_argument("--seed", type=int, default=0, help="jitter/loss seed")
    g.add_argument("--radio", default=None, help="device radio model (default: lte for --channel lte, else wifi)")
    g.add_argument("--device-profile", default="phone", help="cpu-model meter profile")
    g.add_argument("--no-assisted", action="store_true", help="skip transformers assisted generation")
    g.add_argument(
        "--no-oracle",
        action="store_true",
        help="skip the oracle rows (an offline bound from teacher-forced verdicts and the fixed-K runs' costs)",
    )
    g.add_argument("--no-plots", action="store_true", help="write table and summary only, no PNGs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.set_defaults(radio_rates_mbit=(0.0, 0.0))  # the radio model's own; main sets the channel's (radio_rates)
    r = sub.add_parser("report", help="rebuild table, summary and plots of a finished run folder (no devices run)")
    r.add_argument("dir", type=Path, help="a folder written by gelato-bench gsm8k (its summary.json, rounds, outputs)")
    r.add_argument(
        "--data",
        type=Path,
        default=None,
        help="GSM8K test JSONL for the gold answers (default: the run's recorded path if it exists, "
        "else as gsm8k --data)",
    )
    r.add_argument("--no-plots", action="store_true", help="rebuild table and summary only, no PNGs")
    r.add_argument("--plots-only", action="store_true", help="only redraw the PNGs (references not re-run)")
    r.add_argument(
        "--rerun-assisted",
        action="store_true",
        help="measure transformers' assisted generation again (default: keep the row measured with the run)",
    )
    return p


# ---------------------------------------------------------------- the plan


def controller_variants(selected: list[str], pipeline: str) -> list[tuple[str, str]]:
    """(family, pipelining mode) of every lyapunov/gelato configuration, in plan order."""
    return [(f, mode) for f in ("lyapunov", "gelato") if f in selected for mode in pipeline_modes(pipeline)]


def base_specs(selected: list[str], args: argparse.Namespace) -> list[RunSpec]:
    kmax = ("--k-max", str(args.k_max))
    specs = [RunSpec("ar-edge", "ar-edge", "reference")]
    specs += [RunSpec(p, p, "fixed") for p in selected if p.startswith("fixed-")]
    specs += [RunSpec("ar-device", "ar-device", "reference")] if "ar-device" in selected else []
    specs += [RunSpec("heuristic", "heuristic", "heuristic", kmax)] if "heuristic" in selected else []
    if "entropy" in selected:
        specs += [
            RunSpec(f"entropy τ={t:g}", "entropy", "entropy", (*kmax, "--entropy-threshold", f"{t:g}"))
            for t in floats(args.entropy_thresholds)
        ]
    if "adaedl" in selected:
        specs += [
            RunSpec(f"adaedl λ={lam:g}", "adaedl", "adaedl", (*kmax, "--adaedl-lambda", f"{lam:g}"))
            for lam in floats(args.adaedl_lambdas)
        ]
    for family, mode in controller_variants(selected, args.pipeline):
        specs.append(controller_spec(family, mode, None, None, args))
    return specs


def controller_spec(family: str, mode: str, budget: float | None, v: float | None, args: argparse.Namespace) -> RunSpec:
    flags: tuple[str, ...] = ("--k-max", str(args.k_max))
    if mode != "off":
        flags += ("--pipeline", mode)
    if mode == "send-ahead" and args.ahead_blocks is not None:
        flags += ("--ahead-blocks", str(args.ahead_blocks))
    label = family + ("" if mode == "off" else f"+{mode}")
    if budget is not None:
        flags += ("--energy-budget-j-per-token", repr(budget))
        label += f" ē={budget * 1e3:.3g}mJ"
    if v is not None:
        flags += ("--v", f"{v:g}")
        label += f" V={v:g}"
    return RunSpec(label, family, family, flags, budget, v, mode)


def budget_specs(selected: list[str], args: argparse.Namespace, budgets: list[float]) -> list[RunSpec]:
    vs: list[float | None] = list(floats(args.v)) or [None]
    variants = controller_variants(selected, args.pipeline)
    return [controller_spec(f, mode, b, v, args) for b in budgets for v in vs for f, mode in variants]


def choose_budgets(args: argparse.Namespace, fixed: list[dict[str, Any]]) -> list[float]:
    if args.budgets:
        return floats(args.budgets)
    jpt = [s["energy_j_per_token"] for s in fixed if s["energy_j_per_token"] and s["policy"] != "fixed-0"]
    return [min(jpt) * f for f in floats(args.budget_factors)] if jpt else []


# ---------------------------------------------------------------- the recorded command


def _num(x: float) -> str:
    return f"{x:g}"


def reproduce_command(args: argparse.Namespace, profile: Profile) -> str:
    """The `gelato-bench gsm8k` command written into summary.json and table.md: every option that
    shapes which runs are made and how, at the value this run resolved it to (the parser's default
    included, and the channel's parameters from its profile), so the command makes the same runs
    under later defaults; then the options that only place or trim outputs, where given. Call it
    after `--radio` is resolved and before `--out`/`--data` are (those stay as given). A pure
    function of its arguments; one line."""
    a = args
    words = ["gelato-bench", "gsm8k", "--devices", str(a.devices), "--limit", str(a.limit), "--policies", a.policies]
    words += ["--budgets", a.budgets] if a.budgets else ["--budget-factors", a.budget_factors]
    words += ["--v", a.v] if a.v else []  # empty: gelato-device's own V (not known here)
    words += ["--pipeline", ",".join(pipeline_modes(a.pipeline))]
    words += ["--ahead-blocks", str(a.ahead_blocks)] if a.ahead_blocks is not None else []
    words += ["--k-max", str(a.k_max), "--entropy-thresholds", a.entropy_thresholds]
    words += ["--adaedl-lambdas", a.adaedl_lambdas, "--max-new-tokens", str(a.max_new_tokens)]
    words += ["--instruction", a.instruction] if a.instruction else []  # every prompt's text
    words += ["--drafter", a.drafter] if a.drafter else []
    words += ["--target", a.target] if a.target else []
    words += ["--channel", profile.name]
    if profile.impaired:  # `none` takes no impairment parameters
        words += ["--one-way-ms", _num(profile.one_way_ms), "--jitter-ms", _num(profile.jitter_ms)]
        words += ["--up-mbit", _num(profile.up_mbit), "--down-mbit", _num(profile.down_mbit)]
        words += ["--loss", _num(profile.loss)]
        words += ["--loss-stall-ms", _num(profile.loss_stall_ms)] if profile.loss else []
    words += ["--delay-mechanism", a.delay_mechanism, "--seed", str(a.seed)]
    words += ["--radio", a.radio, "--device-profile", a.device_profile]
    words += ["--data", str(a.data)] if a.data is not None else []
    words += ["--out", str(a.out)] if a.out is not None else []
    flags = ("force", "no_assisted", "no_oracle", "no_plots", "no_progress")
    words += ["--" + f.replace("_", "-") for f in flags if getattr(a, f)]
    return shlex.join(words)


# ---------------------------------------------------------------- running


def pinning(devices: int, relay: bool = True) -> tuple[int | None, list[int | None], str]:
    """The edge's CPU, each device's, and the line that says so (what `Channel.prefix` will do:
    nothing without `taskset`). `relay`: the channel has a relay, pinned with the edge."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        return None, [None] * devices, "not pinned (one CPU)"
    if shutil.which("taskset") is None:
        return None, [None] * devices, "not pinned (no taskset)"
    edge, rest = cores[0], cores[1:]
    devs: list[int | None] = [rest[d % len(rest)] for d in range(devices)]
    shared = "" if devices <= len(rest) else f" ({devices} devices share {len(rest)} CPU(s): CPU-bound)"
    who = "edge + channel relay" if relay else "edge"
    return edge, devs, f"{who} on CPU {edge}, devices on CPU(s) {sorted(set(devs))}{shared}"  # type: ignore[type-var]


def progress_bar(total: int, disabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="q", desc="gsm8k", disable=disabled, dynamic_ncols=True, smoothing=0.05)


class Bench:
    """The channel, the edge and the fleet of one `gelato-bench gsm8k` run."""

    def __init__(self, args: argparse.Namespace, profile: Profile, questions: list[dict[str, Any]]) -> None:
        self.args, self.profile, self.questions = args, profile, questions
        self.edge_cpu, self.device_cpus, self.pinning = pinning(args.devices, relay=profile.impaired)
        self.results: list[RunResult] = []
        self.labels: dict[str, int] = {}  # runs under each label so far (`unique_label`)

    def device_base(self, address: str) -> list[str]:
        a = self.args
        base = ["--edge", address, "--threads", "1", "--max-new-tokens", str(a.max_new_tokens), *CPU_FLOAT32]
        base += ["--meter", "cpu-model", "--device-profile", a.device_profile, "--radio", a.radio]
        base += ["--connect-timeout-s", "60"]
        up, down = a.radio_rates_mbit
        base += ["--radio-up-mbit", _num(up)] if up else []
        base += ["--radio-down-mbit", _num(down)] if down else []
        return base + (["--drafter", a.drafter] if a.drafter else [])

    def run(self, channel: Channel) -> dict[str, Any]:
        from gelato.benchmarks.procs import start_edge

        a = self.args
        edge_args = ["--threads", "1", *CPU_FLOAT32, *(["--target", a.target] if a.target else [])]
        edge = start_edge(edge_args, prefix=channel.prefix("edge", self.edge_cpu))
        try:
            port = int(edge.address.rsplit(":", 1)[1])
            address = channel.expose(port, self.edge_cpu)
            before = channel.measure(address, port)
            print(f"channel measured: {json.dumps(before['measured'])} (nominal {before['nominal']})", flush=True)
            shards = shard_files(self.questions, a.devices, a.out / "work")
            launch = [channel.prefix("device", cpu) for cpu in self.device_cpus]
            self.fleet = Fleet(launch, self.device_base(address), shards, a.out / "work")
            budgets = self.run_plan()
            after = channel.measure(address, port)
            loss = channel.realised_loss()  # the devices' relay stops here: no run uses it after this
        except RuntimeError as exc:  # ChannelError too: its type (and exit status) is kept
            code = edge.proc.poll()
            if code is not None:  # the edge died: its output, not its devices' (left without it), says why
                exc.args = (f"{exc}\ngelato-edge exited {code} during the run:\n{edge.output()[-3000:]}",)
            raise
        finally:
            edge.stop()
        measured = {"measured_before": before, "measured_after": after, "realised_loss": loss}
        return {**measured, "budgets_j_per_token": budgets}

    def run_plan(self) -> list[float]:
        a = self.args
        selected = [p.strip() for p in a.policies.split(",") if p.strip()]
        base = base_specs(selected, a)
        n_budgets = len(floats(a.budgets or a.budget_factors))
        n_late = n_budgets * max(1, len(floats(a.v))) * len(controller_variants(selected, a.pipeline))
        bar = progress_bar((len(base) + n_late) * len(self.questions), a.no_progress)
        self.fleet.progress = bar
        try:
            for spec in base:
                self.go(spec, bar)
            fixed = [summarize(r) for r in self.results if r.spec.family == "fixed"]
            budgets = choose_budgets(a, fixed)
            if budgets:
                bar.write("budgets ē (mJ/token): " + ", ".join(f"{b * 1e3:.4g}" for b in budgets))
            elif n_late:  # asked for, but no fixed-K (K >= 1) run measured its energy to scale
                bar.write("no budgeted runs: no fixed-K run (K >= 1) read a J/token for --budget-factors to scale")
            for spec in budget_specs(selected, a, budgets):
                self.go(spec, bar)
        finally:
            bar.close()
        return budgets

    def go(self, spec: RunSpec, bar: Any) -> None:
        spec = replace(spec, label=unique_label(spec.label, self.labels))
        bar.set_description(spec.label)
        res = self.fleet.run(spec)
        s = summarize(res)
        check_energy_source(spec.label, s["energy"])
        self.results.append(res)  # only a run that passed its checks (a failed run keeps these)
        jpt, acc = s["energy_j_per_token"], s["acceptance"]
        hit = s["ahead_hit_rate"] if spec.pipeline == "send-ahead" else s["predraft_hit_rate"]
        piped = "" if spec.pipeline == "off" else f", {spec.pipeline} hit {'-' if hit is None else f'{hit:.2f}'}"
        bar.write(
            f"{spec.label}: {s['tokens_per_s'] or 0:.1f} tok/s/device, agg {s['aggregate_tokens_per_s']:.1f}, "
            f"{'-' if jpt is None else f'{jpt * 1e3:.3f}'} mJ/token, acc {'-' if acc is None else f'{acc:.3f}'}, "
            f"draft {s['mean_draft_len'] or 0:.2f}{piped} ({res.wall_s:.0f} s)"
        )


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        from gelato.benchmarks.bench_finish import rebuild, replot

        if not (args.dir / "summary.json").is_file():
            parser.error(f"{args.dir}: not a gelato-bench run folder (no summary.json)")
        if no_plots_here := plots_unavailable(args.no_plots and not args.plots_only):
            parser.error(no_plots_here)
        if args.plots_only:
            return replot(args.dir)
        return rebuild(args.dir, args.no_plots, args.rerun_assisted, args.data)
    bad = check_args(args)
    if bad:
        parser.error(bad)
    try:
        profile = profile_from(
            args.channel,
            one_way_ms=args.one_way_ms,
            jitter_ms=args.jitter_ms,
            up_mbit=args.up_mbit,
            down_mbit=args.down_mbit,
            loss=args.loss,
            loss_stall_ms=args.loss_stall_ms,
        )
    except ValueError as exc:
        parser.error(str(exc))
    args.radio = args.radio or ("lte" if args.channel == "lte" else "wifi")
    args.radio_rates_mbit = radio_rates(profile, args.radio)
    command = reproduce_command(args, profile)  # before --out and --data get their defaults
    args.out = args.out or Path(f"benchmarks/results/gsm8k_{args.channel}_n{args.devices}")
    if (args.out / "summary.json").exists() and not args.force:
        # The default folders are the committed results: never written over by accident.
        parser.error(f"--out {args.out} already holds a run (summary.json): choose another --out, or --force")
    if foreign := foreign_files(args.out):
        # A run removes its own kinds of files there (work/, earlier round files and plots):
        # never in a folder that holds anything else, --force or not.
        parser.error(
            f"--out {args.out} holds files gelato-bench does not write ({', '.join(foreign[:3])}"
            f"{', …' if len(foreign) > 3 else ''}): choose a new or empty folder"
        )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        questions = load_questions(args)
    except DataError as exc:
        parser.error(str(exc))
    except SystemExit as exc:  # no GSM8K file where it looked: a bad --data (or none), exit 2
        parser.error(str(exc.code).removeprefix("error: "))
    if len(questions) < args.devices:
        parser.error(f"--data {args.data} holds {len(questions)} question(s), fewer than --devices {args.devices}")
    if len(questions) < args.limit:
        print(f"gelato-bench: {args.data} holds {len(questions)} questions: all of them run (--limit {args.limit})")
    print(f"{command}\n{len(questions)} questions, {args.devices} device(s), channel {profile}", flush=True)
    t0 = time.perf_counter()
    bench = Bench(args, profile, questions)
    try:
        channel = Channel(profile, args.seed, args.delay_mechanism)
        with guard(channel), channel:  # SIGTERM during the set-up too: what it made is removed
            measured = bench.run(channel)
            description = channel.describe()
    except ChannelError as exc:
        print(f"gelato-bench: channel {args.channel}: {exc}", file=sys.stderr)
        keep_partial(args.out, command, bench.results, f"channel: {exc}")
        return 2
    except RuntimeError as exc:
        print(f"gelato-bench: {exc}", file=sys.stderr)
        keep_partial(args.out, command, bench.results, str(exc))
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C; SIGTERM/SIGHUP (`guard`): 128 + signal
        return stopped(exc, args.out, command, bench.results)
    from gelato.benchmarks.bench_finish import finish

    try:  # the references (assisted generation, the oracle) may take minutes: stoppable the same way
        with exit_on_signals():
            return finish(args, command, bench, questions, {**description, **measured}, time.perf_counter() - t0)
    except (KeyboardInterrupt, SystemExit) as exc:
        return stopped(exc, args.out, command, bench.results)


def stopped(exc: KeyboardInterrupt | SystemExit, out: Path, command: str, results: list[RunResult]) -> int:
    """A run stopped by Ctrl-C (130) or SIGTERM/SIGHUP (128 + signal): one line, the configurations
    that finished kept in `partial/` as a failed run keeps them, the unfinished `work/` removed."""
    code = 130 if isinstance(exc, KeyboardInterrupt) else exc.code if isinstance(exc.code, int) else 1
    why = "interrupted" if code == 130 else f"stopped by signal {code - 128}" if code > 128 else "stopped"
    print(f"gelato-bench: {why}", file=sys.stderr)
    keep_partial(out, command, results, why)  # what finished is not lost
    shutil.rmtree(out / "work", ignore_errors=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
