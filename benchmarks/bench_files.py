"""What `gelato-bench gsm8k` writes in its `--out` folder, and what it may remove there.

Contract. `write_rounds(results, out)` writes `rounds/<run>.jsonl.gz` (one line per round, floats
to five significant digits: `compact`) and `outputs.jsonl.gz` (every device record without its
prompt), removing round files of an earlier run there that this one did not make.
`foreign_files(out)` names what is in `out` that no run writes (`RUN_FILES` at the top, and in
`work/` anything but the device shards, traces and logs `WORK_FILE` matches): a run that finds any
is refused, since it removes its own kinds of files there. `save_partial(out, command, results,
error)` keeps the configurations of a failed run that finished, in `out/partial/`
(`keep_partial` also says where).
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

from gelato.benchmarks.bench_report import PLOT_NAMES
from gelato.benchmarks.bench_run import RunResult, summarize


def compact(v: Any) -> Any:
    """Floats to five significant digits: the files shrink ~2× and no timing here is that precise."""
    return float(f"{v:.5g}") if isinstance(v, float) else [compact(x) for x in v] if isinstance(v, list) else v


RUN_FILES = frozenset({"summary.json", "table.md", "outputs.jsonl.gz", "rounds", "work", "partial", *PLOT_NAMES})
WORK_FILE = re.compile(r"device\d+\.jsonl|.+\.device\d+\.(jsonl|stderr)")  # shards, traces, stderr (bench_run)


def keep_partial(out: Path, command: str, results: list[RunResult], error: str) -> None:
    kept = save_partial(out, command, results, error)
    if kept is not None:
        print(f"gelato-bench: the {len(results)} configuration(s) that finished are in {kept}", file=sys.stderr)


def save_partial(out: Path, command: str, results: list[RunResult], error: str) -> Path | None:
    """A run that failed after some configurations finished keeps them, in `out/partial/` (a run
    already in `out`, which a --force run would have replaced only on success, stays whole): their
    round files and outputs as a finished run writes them, and `partial.json` (the command, the
    error, each finished run's summary). Not a result (no references, no targets, no table): what
    it measured before it failed, so hours of runs are not lost to the last one. None when nothing
    finished."""
    if not results:
        return None
    folder = out / "partial"
    write_rounds(results, folder)
    path = folder / "partial.json"
    record = {"command": command, "error": error, "runs": [summarize(r) for r in results]}
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def foreign_files(out: Path) -> list[str]:
    """Names in `out` that no gelato-bench run writes (none when it does not exist yet), `work/`'s
    files included: a finished run removes that folder."""
    if not out.is_dir():
        return []
    foreign = [p.name for p in out.iterdir() if p.name not in RUN_FILES]
    work = out / "work"
    if work.is_dir():
        foreign += [f"work/{p.name}" for p in work.iterdir() if not (p.is_file() and WORK_FILE.fullmatch(p.name))]
    return sorted(foreign)


def write_rounds(results: list[RunResult], out: Path) -> None:
    """`rounds/<run>.jsonl.gz`: one line per round; `outputs.jsonl.gz`: one line per run and
    question, the device's record (token ids and text included) without the prompt: what
    `gelato-bench report DIR` rebuilds every output from. Round files of an earlier run in the
    folder (`--force`) that this run did not make are removed: a folder holds one run's files."""
    folder = out / "rounds"
    folder.mkdir(parents=True, exist_ok=True)
    ours = {f"{res.spec.slug}.jsonl.gz" for res in results}
    for old in folder.glob("*.jsonl.gz"):
        if old.name not in ours:
            old.unlink()
    for res in results:
        with gzip.open(folder / f"{res.spec.slug}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({k: compact(v) for k, v in r.items()}) + "\n" for r in res.rounds)
    with gzip.open(out / "outputs.jsonl.gz", "wt", encoding="utf-8") as f:
        for res in results:
            f.writelines(
                json.dumps({"run": res.spec.label, **{k: v for k, v in r.items() if k != "prompt"}}) + "\n"
                for r in res.records
            )
