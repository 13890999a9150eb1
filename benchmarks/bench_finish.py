"""After the device runs of `gelato-bench gsm8k`: references, scoring, targets and every output file.

Contract: `finish(args, command, bench, questions, channel, wall_s)` scores every run (GSM8K
accuracy, exact match against `ar-edge` per question), runs the in-process references (assisted
generation, oracle; `gelato.benchmarks.bench_refs`), checks the targets, writes `summary.json`,
`table.md`, `rounds/*.jsonl.gz` and the plots under `args.out`, prints the table and returns the
exit status (1 when an edge-verified output differs from ar-edge's). `rebuild(out)` does the same
from a finished run's folder (`summary.json`, `outputs.jsonl.gz`, `rounds/`) without re-running a
device: `gelato-bench report DIR` after a change to scoring, references or plots (`--plots-only`:
`replot(out)`, the PNGs alone, nothing re-measured). A rebuild keeps the run's own provenance (its
machine line and `code_at_end`) and, unless asked to re-measure it, the assisted-generation row
measured with the run (a re-run would time it on another day, next to the old runs' tokens/s); it
records what it recomputed, where and with which code under `rebuilt`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gelato.benchmarks import bench_refs
from gelato.benchmarks.bench_report import PLOT_NAMES, exact_match, markdown, plots, score, targets
from gelato.benchmarks.bench_run import RunResult, RunSpec, summarize, token_ids
from gelato.benchmarks.procs import machine
from gelato.device.policy import PolicyOptions

DEVICE_DEFAULTS = PolicyOptions()  # gelato-device's own controller settings, as a run records them


def code_state() -> dict[str, Any]:
    """The commit, the files changed on top of it and a hash of the device/edge/gelato sources:
    other work may change the tree while a long benchmark runs."""
    import hashlib

    from gelato.benchmarks.provenance import ROOT as root
    from gelato.benchmarks.provenance import git_output

    commit = git_output(["rev-parse", "HEAD"])
    # The code the runs ran: results written meanwhile (this run's own folder included) are not it.
    changed = git_output(["status", "--short", "--", "device", "edge", "gelato"]).splitlines()
    files = sorted(p for d in ("device", "edge", "gelato") for p in (root / d).rglob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    return {"commit": commit, "changed": changed, "sources_sha256_12": digest}


def score_runs(results: list[RunResult], gold: list[float | None]) -> tuple[list[dict[str, Any]], list[str]]:
    ref = token_ids(next(r for r in results if r.spec.policy == "ar-edge"))
    rows, bad = [], []
    for res in results:
        s = summarize(res)
        s["gsm8k_accuracy"] = score(res.records, gold)
        same, n = exact_match(token_ids(res), ref)
        s["exact_match"] = f"{same}/{n}"
        if res.spec.policy != "ar-device" and same != n:
            ids = token_ids(res)
            bad += [f"{res.spec.label}: question {q}" for q in ref if ids.get(q) != ref[q]]
        s["per_question"] = [
            {
                k: r.get(k)
                for k in ("question", "device", "n_tokens", "elapsed_s", "energy_j", "rounds", "stop_reason", "correct")
            }
            for r in res.records
        ]
        rows.append(s)
    return rows, bad


def oracle_energy_label(fixed: list[RunResult]) -> str:
    """The oracle rows' energy source: their powers are fitted to the fixed-K runs' metered round
    energies, so they are measured or estimated as those were (every gelato-bench device run meters
    with cpu-model: "simulated from estimated (cpu-model) costs")."""
    sources = {
        (r.get("energy_kind"), r.get("energy_source"))
        for run in fixed
        for r in (*run.records, *run.rounds)
        if r.get("energy_kind") or r.get("energy_source")
    }
    if not sources:
        return "simulated from costs of an unrecorded energy source"
    named = " + ".join(f"{kind or 'unknown'} ({source or 'unknown'})" for kind, source in sorted(sources, key=str))
    return f"simulated from {named} costs"


def references(
    args: argparse.Namespace,
    cpu: int | None,
    results: list[RunResult],
    questions: list[dict[str, Any]],
    kept: Sequence[dict[str, Any]] = (),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Assisted generation and the oracle rows; the oracle's details go to summary.json. `kept`:
    assisted rows measured earlier (a rebuild's), used as they are instead of measuring again."""
    from gelato.models import encode_prompt, load_model

    if args.no_assisted and args.no_oracle:
        return list(kept), {}
    target = load_model(args.target, "target", "float32", "cpu")
    drafter = load_model(args.drafter, "drafter", "float32", "cpu")
    prompts = [encode_prompt(target.tokenizer, q["question"]) for q in questions]
    ar_edge = token_ids(next(r for r in results if r.spec.policy == "ar-edge"))
    rows: list[dict[str, Any]] = list(kept)
    if not args.no_assisted:
        print("assisted generation (transformers, one process) ...", flush=True)
        a = bench_refs.assisted(prompts, target, drafter, args.max_new_tokens, cpu)
        same = sum(ids == ar_edge[q] for q, ids in enumerate(a["token_ids"]))
        texts = [target.tokenizer.decode(ids, skip_special_tokens=True) for ids in a["token_ids"]]
        recs = [{"question": q, "text": t} for q, t in enumerate(texts)]
        acc = score(recs, [q["gold"] for q in questions])
        rows.append(
            {
                "label": "assisted (transformers, 1 process)",
                "measured_at": {"commit": code_state()["commit"], "machine": machine()},
                "mode": a["mode"],
                "policy": "assisted",
                "family": "reference",
                "tokens": a["tokens"],
                "tokens_per_s": a["tokens_per_s"],
                "energy_j_per_token": None,
                "energy": ["n/a: device and edge in one process"],
                "gsm8k_accuracy": acc,
                "exact_match": f"{same}/{len(prompts)}",
            }
        )
    detail: dict[str, Any] = {}
    fixed = [r for r in results if r.spec.family == "fixed" and r.rounds]
    drafted = any(row["k"] > 0 for run in fixed for row in run.rounds)
    if not args.no_oracle and fixed and not drafted:
        print("oracle bound: not made (it needs a fixed-K run with K >= 1, whose rounds give the drafting costs)")
    if not args.no_oracle and drafted:
        print("oracle bound (teacher-forced verdicts + this run's costs) ...", flush=True)
        traces = bench_refs.oracle_traces(prompts, [ar_edge[q] for q in range(len(prompts))], drafter)
        context = min(target.context_limit, drafter.context_limit)
        caps = tuple(sorted({args.k_max, 32}))
        detail = bench_refs.oracle(traces, fixed, args.radio, context, caps, args.radio_rates_mbit)
        energy = oracle_energy_label(fixed)
        rows += [{**o, "family": "reference", "energy": [energy]} for o in detail["rows"]]
    return rows, detail


def _rounds_by_label(results: list[RunResult]) -> dict[str, list[dict[str, Any]]]:
    return {r.spec.label: r.rounds for r in results}


def finish(
    args: argparse.Namespace,
    command: str,
    bench: Any,
    questions: list[dict[str, Any]],
    channel: dict[str, Any],
    wall_s: float,
    previous: dict[str, Any] | None = None,
) -> int:
    """`previous`: the summary a rebuild starts from (its provenance and assisted rows are kept)."""
    from gelato.benchmarks.bench import energy_note
    from gelato.benchmarks.bench_files import write_rounds

    results: list[RunResult] = bench.results
    out: Path = args.out
    rows, bad = score_runs(results, [q["gold"] for q in questions])
    result: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "pinning": bench.pinning,
        "settings": {
            "devices": args.devices,
            "questions": len(questions),
            "data": str(args.data),
            # The questions themselves (a rebuild checks it: the same path may hold another file).
            "questions_sha256_12": questions_digest(questions),
            "max_new_tokens": args.max_new_tokens,
            "instruction": args.instruction,
            "k_max": args.k_max,
            "policies": args.policies,
            "pipeline": args.pipeline,
            "ahead_blocks": args.ahead_blocks,
            "radio": args.radio,
            "radio_rates_mbit": list(args.radio_rates_mbit),  # 0: the radio model's own rate
            "device_profile": args.device_profile,
            "drafter": args.drafter or "built-in",
            "target": args.target or "built-in",
            "seed": args.seed,
            # What the devices used where the command gives no --v / --ahead-blocks: gelato-device's
            # own defaults at this commit (the command does not pin them).
            "device_defaults": {"v": DEVICE_DEFAULTS.v, "ahead_blocks": DEVICE_DEFAULTS.ahead_blocks},
        },
        "channel": channel,
        "energy_note": energy_note(args.device_profile, args.radio, args.radio_rates_mbit),
        "runs": rows,
        "lossless_failures": bad,
        "wall_s": round(wall_s, 1),
        "code_at_end": code_state(),
    }
    if previous is not None:  # a rebuild: the devices' defaults are the run's record, not today's
        recorded = previous.get("settings", {}).get("device_defaults")
        if recorded is None:
            del result["settings"]["device_defaults"]
        else:
            result["settings"]["device_defaults"] = recorded
    kept: list[dict[str, Any]] = []
    if previous is not None:
        kept = [] if args.no_assisted else [r for r in previous.get("references", []) if r["policy"] == "assisted"]
        result.update(machine=previous["machine"], code_at_end=previous.get("code_at_end"))
        result["rebuilt"] = {
            "machine": machine(),
            "code": code_state(),
            "recomputed": "scores, oracle, targets, table"
            + ("" if args.no_plots else ", plots")
            + (
                " (the assisted row as measured, its accuracy not re-scored)"
                if kept
                else ", assisted generation (measured now)"
                if not args.no_assisted
                else ""
            ),
        }
        args.no_assisted = args.no_assisted or bool(kept)
        # Until the references are recomputed, the file keeps the previous ones: a failure below
        # must not lose the assisted row measured with the run.
        result.update({k: previous[k] for k in ("references", "oracle", "targets") if k in previous})
    else:
        write_rounds(results, out)  # what a rebuild reads; a rebuild leaves them byte for byte
        shutil.rmtree(out / "partial", ignore_errors=True)  # an earlier failed run's (--force): superseded
    # What `rebuild` needs goes to disk before the references run: a failure there loses nothing.
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    refs, oracle_detail = references(args, bench.device_cpus[0], results, questions, kept)
    result.update(references=refs, oracle=oracle_detail)
    result["targets"] = targets(rows, [r for r in refs if r["policy"] == "oracle"], args.k_max)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table.md").write_text(md := markdown(result))
    if not args.no_plots:
        plots(result, _rounds_by_label(results), out)
    elif previous is None:  # a new run without plots: an earlier run's (--force) are not its own
        for name in PLOT_NAMES:
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    print("\n" + md)
    if bad:
        print("LOSSLESSNESS VIOLATED: " + "; ".join(bad[:20]))
        return 1
    return 0


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def replot(out: Path) -> int:
    """Only the PNGs, from `summary.json` and `rounds/` (nothing re-measured)."""
    summary = json.loads((out / "summary.json").read_text())
    rounds = {
        r["label"]: _read_jsonl_gz(out / "rounds" / f"{RunSpec(r['label'], r['policy'], r['family']).slug}.jsonl.gz")
        for r in summary["runs"]
    }
    print("\n".join(str(p) for p in plots(summary, rounds, out)))
    return 0


def questions_digest(questions: list[dict[str, Any]]) -> str:
    """12 hex digits of SHA-256 over the questions' text, in order."""
    return hashlib.sha256(json.dumps([q["question"] for q in questions]).encode()).hexdigest()[:12]


def rebuild(out: Path, no_plots: bool = False, rerun_assisted: bool = False, data: Path | None = None) -> int:
    """`gelato-bench report DIR`: everything from the run's files; the assisted row is measured
    again only with `rerun_assisted` (or where the run has none, unless it was made with
    `--no-assisted`). The GSM8K file (for the gold
    answers): `data`, else the path the run recorded if it exists here, else the default
    (`GELATO_GSM8K_DIR`, or ../shared/data/gsm8k beside the clone)."""
    from gelato.benchmarks.bench import pinning
    from gelato.benchmarks.bench_run import load_questions

    summary = json.loads((out / "summary.json").read_text())
    st = summary["settings"]
    outputs = _read_jsonl_gz(out / "outputs.jsonl.gz")
    results = []
    for run in summary["runs"]:
        spec = RunSpec(
            run["label"],
            run["policy"],
            run["family"],
            tuple(run["flags"]),
            run["budget_j_per_token"],
            run["v"],
            run.get("pipeline", "off"),  # older results: a bool (True: local); RunSpec reads both
        )
        records = [o for o in outputs if o["run"] == spec.label]
        rounds = _read_jsonl_gz(out / "rounds" / f"{spec.slug}.jsonl.gz")
        results.append(RunResult(spec, records, rounds, run["wall_s"], run.get("loadavg_1min_after")))
    # A run made with --no-assisted has no assisted row, and its rebuild measures none: the row
    # would be today's machine's, not the run's (`rerun_assisted` asks for one all the same).
    skipped_assisted = "--no-assisted" in shlex.split(summary["command"]) and not rerun_assisted
    args = argparse.Namespace(
        out=out,
        data=data or (Path(st["data"]) if Path(st["data"]).is_file() else None),
        limit=st["questions"],
        no_assisted=skipped_assisted,
        no_oracle=False,
        no_plots=no_plots,
        drafter=None if st["drafter"] == "built-in" else st["drafter"],
        target=None if st["target"] == "built-in" else st["target"],
        ahead_blocks=st.get("ahead_blocks"),
        instruction=st.get("instruction", ""),  # runs before it existed: none
        radio_rates_mbit=tuple(st.get("radio_rates_mbit", (0.0, 0.0))),  # before: the radio's own rates
        **{
            k: st[k]
            for k in ("devices", "max_new_tokens", "k_max", "policies", "pipeline", "radio", "device_profile", "seed")
        },
    )
    bench = SimpleNamespace(results=results, pinning=summary["pinning"], device_cpus=pinning(1)[1])
    questions = load_questions(args)
    recorded = st.get("questions_sha256_12")  # runs before 2026-12-05 recorded none: not checked
    if recorded and recorded != questions_digest(questions):
        raise SystemExit(
            f"gelato-bench report: {args.data} does not hold the {st['questions']} questions this run asked "
            f"(their digest {recorded}, this file's {questions_digest(questions)}): give the run's file with --data"
        )
    previous = {**summary, "references": []} if rerun_assisted else summary
    return finish(args, summary["command"], bench, questions, summary["channel"], summary["wall_s"], previous)
