"""`gelato-bench gsm8k` (gelato.benchmarks.bench*): the harness end to end on tiny random models over
loopback (`--channel none`), its rebuild from the files it wrote, its refusals (arguments, run folders,
missing matplotlib), what a failed run keeps, and a fleet or edge that fails mid-run. The pieces it is
made of are in test_bench_pieces.py and test_bench_targets.py."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gelato.benchmarks import bench, bench_files
from gelato.benchmarks.bench_run import RunResult, RunSpec
from gelato.tiny.random_pair import synthetic_problem


@pytest.fixture(scope="module")
def gsm8k_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GSM8K-shaped test file (question, answer ending in `#### N`) of the project's own problems."""
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    rows = [dict(zip(("question", "answer"), synthetic_problem(rng), strict=True)) for _ in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_bench(args: list[str], timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gelato.benchmarks.bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def test_gsm8k_end_to_end_on_loopback(pair: dict[str, Path], gsm8k_like: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["gsm8k", "--limit", "2", "--channel", "none", "--data", str(gsm8k_like), "--out", str(out)]
    args += ["--target", str(pair["target"]), "--drafter", str(pair["drafter_agree"]), "--max-new-tokens", "10"]
    args += ["--policies", "ar-edge,ar-device,fixed-0,fixed-2,gelato", "--budget-factors", "1.0"]
    args += ["--devices", "2", "--v", "10", "--pipeline", "send-ahead", "--ahead-blocks", "3", "--no-progress"]
    args += ["--instruction", "Answer in one line."]  # every run and reference asks the same
    (out / "partial").mkdir(parents=True)
    (out / "partial" / "partial.json").write_text("{}")  # an earlier run into this folder that failed
    res = run_bench(args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (out / "partial").exists()  # superseded by the finished run
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["device_defaults"] == {"v": 20.0, "ahead_blocks": 2}  # what an unpinned run used
    assert s["settings"]["instruction"] == "Answer in one line."
    assert "each followed by 'Answer in one line.'" in (out / "table.md").read_text()
    labels = [r["label"] for r in s["runs"]]
    assert labels[:5] == ["ar-edge", "fixed-0", "fixed-2", "ar-device", "gelato+send-ahead"]
    assert len(labels) == 6 and labels[5].startswith("gelato+send-ahead ē=") and labels[5].endswith("V=10")
    sa = s["runs"][4]
    assert sa["pipeline"] == "send-ahead" and sa["flags"][-4:] == ["--pipeline", "send-ahead", "--ahead-blocks", "3"]
    assert sa["wasted_tokens_per_token"] >= 0 and {"ahead_hit_rate", "predraft_hit_rate", "wasted_j_per_token"} <= set(
        sa
    )
    assert s["runs"][1]["pipeline"] == "off" and s["runs"][1]["ahead_hit_rate"] is None
    for r in s["runs"]:
        assert r["questions"] == 2 and r["errors"] == 0 and len(r["per_device"]) == 2
        assert r["energy_j_per_token"] > 0 and r["energy"] == ["cpu-model (estimated)"]
        assert r["exact_match"] == "2/2" or r["policy"] == "ar-device"  # greedy: lossless
        assert (out / "rounds" / f"{RunSpec(r['label'], r['policy'], r['family']).slug}.jsonl.gz").exists()
    refs = {r["policy"]: r for r in s["references"]}
    # The random pair's target has padded embedding rows: transformers then runs universal assisted
    # decoding (text re-tokenized between the models), which need not match token for token.
    assert refs["assisted"]["mode"].startswith("universal") and refs["assisted"]["exact_match"].endswith("/2")
    assert refs["oracle"]["tokens_per_s"] > 0
    assert s["channel"]["mechanisms"]["delay"].startswith("none") and s["lossless_failures"] == []
    assert s["channel"]["realised_loss"] is None  # loopback: no relay, no loss counted
    table = (out / "table.md").read_text()
    for column in ("tokens/s/device", "Σ device tokens/s", "fleet tokens/s", "device mJ/token", "GSM8K acc"):
        assert column in table
    assert "exact vs ar-edge" in table
    for r in s["runs"]:  # each device's questions lie within the fleet's span: its rate is at most the Σ
        assert 0 < r["fleet_tokens_per_s"] <= 1.01 * r["aggregate_tokens_per_s"]
    assert "ahead hit" in table and "wasted mJ/tok" in table
    for png in ("pareto.png", "q_trace.png", "draft_hist.png", "calibration.png", "devices.png"):
        assert (out / png).stat().st_size > 1000, png
    with gzip.open(out / "rounds" / "fixed-2.jsonl.gz", "rt") as f:
        row = json.loads(f.readline())
    assert {"device", "question", "k", "accepted", "t_round_s", "q_deficit_j", "entropies"} <= set(row)
    assert not (out / "work").exists()

    # The run's provenance and its measured assisted row are kept (made to differ from what this
    # machine and tree would write); the rounds are read, not rewritten; what was recomputed is said.
    elsewhere = {**s, "machine": "another machine", "code_at_end": {"commit": "0" * 40}}
    # A run recorded before its devices' defaults were: a rebuild must not claim today's for it.
    elsewhere["settings"] = {k: v for k, v in s["settings"].items() if k != "device_defaults"}
    (out / "summary.json").write_text(json.dumps(elsewhere))
    rounds_bytes = (out / "rounds" / "fixed-2.jsonl.gz").read_bytes()
    again = run_bench(["report", str(out), "--no-plots"])  # rebuilt from the files alone
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = json.loads((out / "summary.json").read_text())
    assert [r["tokens"] for r in rebuilt["runs"]] == [r["tokens"] for r in s["runs"]]
    assert rebuilt["settings"]["instruction"] == "Answer in one line."  # the questions' digest held with it
    assert rebuilt["machine"] == "another machine" and rebuilt["code_at_end"] == {"commit": "0" * 40}
    assert "device_defaults" not in rebuilt["settings"]
    assert [r for r in rebuilt["references"] if r["policy"] == "assisted"] == [refs["assisted"]]
    assert refs["assisted"]["measured_at"]["commit"] == s["code_at_end"]["commit"]
    assert "the assisted row as measured" in rebuilt["rebuilt"]["recomputed"] and rebuilt["rebuilt"]["code"]["commit"]
    assert "plots" not in rebuilt["rebuilt"]["recomputed"]  # --no-plots: none was redrawn
    assert (out / "rounds" / "fixed-2.jsonl.gz").read_bytes() == rounds_bytes
    assert "Rebuilt from this run's files" in (out / "table.md").read_text()
    again = run_bench(["report", str(out), "--no-plots", "--rerun-assisted"])
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = json.loads((out / "summary.json").read_text())
    assert "assisted generation (measured now)" in rebuilt["rebuilt"]["recomputed"]
    assert [r["policy"] for r in rebuilt["references"]].count("assisted") == 1
    # Another file at --data (or at the recorded path) with other questions: refused, not scored
    # against gold answers and prompts that are not this run's.
    other = tmp_path / "other.jsonl"
    lines = gsm8k_like.read_text().splitlines()
    other.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    summary_before = (out / "summary.json").read_text()
    refused = run_bench(["report", str(out), "--no-plots", "--data", str(other)])
    assert refused.returncode != 0 and "does not hold the 2 questions this run asked" in refused.stderr
    assert (out / "summary.json").read_text() == summary_before


def test_missing_data_is_one_line_error(tmp_path: Path) -> None:
    res = run_bench(["gsm8k", "--channel", "none", "--data", str(tmp_path / "nope.jsonl")], timeout_s=60)
    assert res.returncode != 0 and "GSM8K test split not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_arguments_are_usage_errors() -> None:
    res = run_bench(["gsm8k", "--devices", "4", "--limit", "2"], timeout_s=60)
    assert res.returncode == 2 and "--limit must be >= --devices" in res.stderr
    res = run_bench(["gsm8k", "--channel", "none", "--one-way-ms", "5"], timeout_s=60)
    assert res.returncode == 2 and "takes no impairment" in res.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--budgets", "abc"], "--budgets: expected a comma list of numbers"),
        (["--v", "x"], "--v: expected a comma list of numbers"),
        (["--entropy-thresholds", "1,nan"], "--entropy-thresholds: values must be finite"),
        (["--policies", "ar-edge,gelatto"], "--policies: unknown policy 'gelatto'"),
        (["--radio", "6g"], "--radio: unknown radio '6g'"),
        (["--device-profile", "toaster"], "--device-profile: unknown profile 'toaster'"),
        (["--budgets", "0.01", "--budget-factors", "1.5"], "--budgets and --budget-factors exclude each other"),
    ],
)
def test_bad_lists_are_usage_errors_before_anything_starts(
    extra: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:  # were it not refused, --limit < --devices would stop it
        bench.main(["gsm8k", "--channel", "none", "--devices", "2", "--limit", "1", *extra])
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_a_run_without_matplotlib_is_refused_at_its_start_unless_no_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """matplotlib is the dev extra's: without it, plots would fail after the whole run (and skip
    its clean-up). A run, a report and the simulator say so before anything starts."""
    from gelato.benchmarks import simulate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    needle = "plots need matplotlib (pip install 'matplotlib>=3.8', or the project's dev extra); or pass --no-plots"
    args = ["gsm8k", "--channel", "none", "--out", str(tmp_path / "run")]
    assert bench.check_args(bench.build_parser().parse_args(args)) == needle
    assert bench.check_args(bench.build_parser().parse_args([*args, "--no-plots"])) == ""
    (tmp_path / "summary.json").write_text("{}")
    for argv in (["report", str(tmp_path)], ["report", str(tmp_path), "--plots-only"]):
        with pytest.raises(SystemExit) as info:
            bench.main(argv)
        assert info.value.code == 2 and needle in capsys.readouterr().err
    traces = tmp_path / "traces.json"
    with pytest.raises(SystemExit) as info:
        simulate.parse_args(["--traces", str(traces), "--out", str(tmp_path / "sim")])
    assert info.value.code == 2 and needle in capsys.readouterr().err
    assert simulate.parse_args(["--traces", str(traces), "--out", str(tmp_path / "sim"), "--no-plots"]).no_plots


def test_a_finished_run_is_not_written_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default --out folders are the committed results: a run refuses a folder holding one."""
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        bench.main(["gsm8k", "--channel", "none", "--out", str(tmp_path)])
    assert info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        bench.main(["report", str(tmp_path / "nothing-here")])
    assert info.value.code == 2 and "not a gelato-bench run folder" in capsys.readouterr().err


def test_a_folder_holding_other_files_is_refused_force_or_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run removes its own kinds of files in --out (work/, earlier round files and plots): a
    folder that holds anything else (`--out .` in a project with its own work/) is refused before
    anything runs, with --force too; a folder of an earlier run's files alone is not."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mine.txt").write_text("keep")
    (tmp_path / "notes.md").write_text("keep")
    for force in ([], ["--force"]):
        with pytest.raises(SystemExit) as info:
            bench.main(["gsm8k", "--channel", "none", "--out", str(tmp_path), *force])
        assert info.value.code == 2
        assert "holds files gelato-bench does not write (notes.md, work/mine.txt)" in capsys.readouterr().err
    assert (tmp_path / "work" / "mine.txt").read_text() == "keep"
    (tmp_path / "notes.md").unlink()
    # Its own work/ alone (a run removes that folder when it ends): refused as well.
    with pytest.raises(SystemExit) as info:
        bench.main(["gsm8k", "--channel", "none", "--out", str(tmp_path), "--force"])
    assert info.value.code == 2 and "(work/mine.txt)" in capsys.readouterr().err
    (tmp_path / "work" / "mine.txt").unlink()
    for name in ("device0.jsonl", "fixed-2.device0.jsonl", "fixed-2.device0.stderr"):  # a killed run's
        (tmp_path / "work" / name).write_text("")
    for name in ("summary.json", "table.md", "pareto.png", "devices.png"):
        (tmp_path / name).write_text("{}")
    assert bench_files.foreign_files(tmp_path) == [] and bench_files.foreign_files(tmp_path / "new") == []


def test_plots_an_earlier_run_left_are_removed(tmp_path: Path) -> None:
    """`--force` into a folder of an 8-device run with one device: its devices.png (a plot this
    run has no data for) does not stay beside the new run's table."""
    from gelato.benchmarks.bench_report import plots

    (tmp_path / "devices.png").write_bytes(b"old")
    (tmp_path / "q_trace.png").write_bytes(b"old")
    result = {"settings": {"devices": 1}, "runs": [], "references": []}
    written = plots(result, {}, tmp_path)
    assert not (tmp_path / "devices.png").exists() and not (tmp_path / "q_trace.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_a_failed_run_keeps_the_configurations_that_finished(tmp_path: Path) -> None:
    """A run that fails at its 40th configuration does not lose the 39 before it: their round
    files and outputs as a finished run writes them, and partial.json with the error and each
    one's summary, in partial/: a finished run already in the folder (a --force run that failed)
    keeps every file of its own. Nothing finished: nothing written."""
    assert bench_files.save_partial(tmp_path / "none", "cmd", [], "boom") is None
    assert not (tmp_path / "none").exists()
    earlier = {"summary.json": "{}", "outputs.jsonl.gz": "old", "rounds/gelato.jsonl.gz": "old"}
    for name, text in earlier.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    done = RunResult(
        RunSpec("fixed-4", "fixed-4", "fixed"),
        [{"question": 0, "device": 0, "n_tokens": 5, "elapsed_s": 0.5, "energy_j": 0.1, "token_ids": [1]}],
        [{"round": 0, "device": 0, "k": 4, "accepted": 3, "emitted": 4, "t_round_s": 0.1, "t_net_s": 0.02}],
    )
    path = bench_files.save_partial(tmp_path, "gelato-bench gsm8k ...", [done], "fixed-8: gelato-device [0] failed")
    partial = tmp_path / "partial"
    assert path == partial / "partial.json" and (partial / "rounds" / "fixed-4.jsonl.gz").exists()
    assert (partial / "outputs.jsonl.gz").exists() and bench_files.foreign_files(tmp_path) == []
    assert all((tmp_path / name).read_text() == text for name, text in earlier.items())
    record = json.loads(path.read_text())
    assert record["error"] == "fixed-8: gelato-device [0] failed" and record["command"] == "gelato-bench gsm8k ..."
    assert [r["label"] for r in record["runs"]] == ["fixed-4"] and record["runs"][0]["tokens"] == 5


def test_a_forced_run_leaves_no_round_files_of_the_run_before(tmp_path: Path) -> None:
    """`--force` into a folder with an earlier run: that run's round files for configurations this
    one did not make are gone (they once stayed beside the new run's, e.g. `gelato_pipe*` after a
    run with other pipeline modes); files that are not round files are left alone."""
    rounds = tmp_path / "rounds"
    rounds.mkdir()
    for name in ("gelato_pipe.jsonl.gz", "fixed-4.jsonl.gz", "notes.txt"):
        (rounds / name).write_bytes(b"old")
    run = RunResult(RunSpec("fixed-4", "fixed-4", "fixed"), [{"question": 0}], [{"round": 0}])
    bench_files.write_rounds([run], tmp_path)
    assert sorted(p.name for p in rounds.iterdir()) == ["fixed-4.jsonl.gz", "notes.txt"]
    with gzip.open(rounds / "fixed-4.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == [{"round": 0}]


def test_a_fleet_that_goes_silent_is_stopped_with_its_reason(tmp_path: Path) -> None:
    """A device that hangs (here: a launcher that only sleeps) ends the run once no device has
    finished a question for `silence_s`, with a message that says so; the device is killed. The
    limit is on silence, not on the run: a long run that keeps finishing questions goes on."""
    import time

    from gelato.benchmarks.bench_run import Fleet, RunSpec

    fleet = Fleet(
        [["sh", "-c", "exec sleep 60", "hung"]], [], [tmp_path / "d0.jsonl"], tmp_path / "work", silence_s=0.5
    )
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"no device finished a question or exited for 0.5 s \(0 questions done\)"):
        fleet.run(RunSpec("fixed-2", "fixed-2", "fixed"))
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("kind", ["device", "channel"])
def test_an_edge_that_dies_mid_run_is_named_with_its_output(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The devices fail because their edge died: the error carries the edge's exit status and last
    output (e.g. its out-of-memory), not only the devices' connection errors; a channel error stays
    one (its exit status is 2)."""
    from types import SimpleNamespace

    from gelato.benchmarks import procs
    from gelato.benchmarks.channel import ChannelError

    class DeadEdge:
        address = "127.0.0.1:1"
        proc = SimpleNamespace(poll=lambda: 3)

        def output(self) -> str:
            return "RuntimeError: CUDA out of memory"

        def stop(self) -> int:
            return 3

    monkeypatch.setattr(procs, "start_edge", lambda *a, **k: DeadEdge())
    channel = SimpleNamespace(
        prefix=lambda side, cpu=None: [],
        expose=lambda port, cpu=None: "127.0.0.1:1",
        measure=lambda *a: {"measured": {}, "nominal": {}},
    )
    args = bench.build_parser().parse_args(["gsm8k", "--channel", "none", "--limit", "1", "--devices", "1"])
    args.out = Path("/nonexistent")
    run = object.__new__(bench.Bench)
    run.args, run.edge_cpu, run.device_cpus, run.questions = args, None, [None], [{"question": "q"}]

    def failing_plan() -> list[float]:
        if kind == "channel":
            raise ChannelError("channel probe failed: connection refused")
        raise RuntimeError("fixed-2: gelato-device [0] failed: connection refused")

    monkeypatch.setattr(run, "run_plan", failing_plan)
    monkeypatch.setattr(bench, "shard_files", lambda *a: [Path("/nonexistent/d0.jsonl")])
    with pytest.raises(RuntimeError) as info:
        run.run(channel)  # type: ignore[arg-type]
    text = str(info.value)
    assert isinstance(info.value, ChannelError) == (kind == "channel")
    assert "connection refused" in text and "gelato-edge exited 3 during the run" in text
    assert "CUDA out of memory" in text


def test_the_pinning_line_says_what_was_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without taskset nothing is pinned (the channel's launcher drops it): the line says so rather
    than naming CPUs; without a relay (`--channel none`) it names the edge alone."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/" + name)
    assert bench.pinning(2) == (
        0,
        [1, 1],
        "edge + channel relay on CPU 0, devices on CPU(s) [1] (2 devices share 1 CPU(s): CPU-bound)",
    )
    assert bench.pinning(1, relay=False)[2] == "edge on CPU 0, devices on CPU(s) [1]"
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench.pinning(2) == (None, [None, None], "not pinned (no taskset)")
