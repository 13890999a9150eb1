"""`gelato-bench gsm8k` (gelato.benchmarks.bench*): the harness end to end on tiny random models over
loopback (`--channel none`), its rebuild from the files it wrote, and the pieces it is made of —
GSM8K scoring, the plan, sharding, latency percentiles, targets, the oracle's cost fit."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gelato.benchmarks import bench, bench_files, bench_refs
from gelato.benchmarks.bench_plots import observed
from gelato.benchmarks.bench_report import gsm8k_answer, score, target_lines, targets
from gelato.benchmarks.bench_run import (
    RunResult,
    RunSpec,
    answered_rounds,
    percentile,
    pipeline_stats,
    shard_files,
    shard_index,
    summarize,
    token_latencies,
)
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


# ---------------------------------------------------------------- pieces


def test_gsm8k_answer_and_score() -> None:
    assert gsm8k_answer("so 3*2=6\n#### 1,234") == 1234.0
    assert gsm8k_answer("#### $-5.5 dollars") == -5.5
    assert gsm8k_answer("no final answer") is None
    # Instruct models, asked (`--instruction`): the last \\boxed{}, else the last "the answer is".
    assert gsm8k_answer("First \\boxed{12}, then corrected: \\boxed{ 1,500 }.") == 1500.0
    assert gsm8k_answer("So the final answer is: $42.") == 42.0
    assert gsm8k_answer("#### 5 (not \\boxed{6})") == 5.0  # GSM8K's own mark first
    assert gsm8k_answer("\\boxed{x+1}") is None
    recs = [{"question": 0, "text": "#### 18"}, {"question": 1, "text": "#### 4"}, {"question": 2, "text": "?"}]
    assert score(recs, [18.0, 3.0, 1.0]) == pytest.approx(1 / 3)
    assert [r["correct"] for r in recs] == [True, False, False]


def test_plan_order_and_flags() -> None:
    args = bench.build_parser().parse_args(["gsm8k", "--pipeline", "both", "--v", "5,50", "--k-max", "6"])
    selected = bench.DEFAULT_POLICIES.split(",")
    base = bench.base_specs(selected, args)
    assert [s.label for s in base[:3]] == ["ar-edge", "fixed-0", "fixed-1"]
    assert [s.label for s in base[-4:]] == ["lyapunov", "lyapunov+local", "gelato", "gelato+local"]
    assert [s.pipeline for s in base[-4:]] == ["off", "local", "off", "local"]
    late = bench.budget_specs(selected, args, [0.01])
    assert len(late) == 2 * 4  # V values x (lyapunov, gelato) x (plain, pipelined)
    g = next(s for s in late if s.label == "gelato+local ē=10mJ V=50")
    assert g.flags == ("--k-max", "6", "--pipeline", "local", "--energy-budget-j-per-token", "0.01", "--v", "50")
    assert bench.choose_budgets(
        args, [{"policy": "fixed-0", "energy_j_per_token": 0.001}, {"policy": "fixed-2", "energy_j_per_token": 0.004}]
    ) == [0.004, 0.005]


def test_pipeline_modes() -> None:
    parse = bench.build_parser().parse_args
    assert parse(["gsm8k"]).pipeline == "all"
    assert bench.pipeline_modes("all") == ["off", "local", "send-ahead"]
    assert bench.pipeline_modes("both") == ["off", "local"]
    assert bench.pipeline_modes("send-ahead, off,local,off") == ["send-ahead", "off", "local"]
    for bad in ("", "on", "local,fast"):
        with pytest.raises(ValueError, match="--pipeline"):
            bench.pipeline_modes(bad)
    args = parse(["gsm8k", "--pipeline", "off,send-ahead", "--ahead-blocks", "4", "--policies", "fixed-4,gelato"])
    assert bench.check_args(args) == ""
    specs = bench.base_specs(["gelato"], args)
    assert [(s.label, s.pipeline) for s in specs[1:]] == [("gelato", "off"), ("gelato+send-ahead", "send-ahead")]
    assert specs[2].flags == ("--k-max", "8", "--pipeline", "send-ahead", "--ahead-blocks", "4")
    assert specs[2].slug == "gelato_send-ahead"
    assert "--pipeline" in bench.check_args(parse(["gsm8k", "--pipeline", "sideways"]))
    # Older summaries hold a bool: RunSpec reads it as a mode.
    assert RunSpec("gelato+pipe", "gelato", "gelato", pipeline=True).pipeline == "local"  # type: ignore[arg-type]
    assert RunSpec("gelato", "gelato", "gelato", pipeline=False).pipeline == "off"  # type: ignore[arg-type]


def test_recorded_command_spells_out_resolved_defaults() -> None:
    """The command written into summary.json / table.md names every run-shaping option at the value
    this run used, defaults included (`--pipeline`'s default was once `both`, now `all`): parsed
    again, it makes the same plan with the same channel, whatever the defaults are then."""
    import shlex

    from gelato.benchmarks.channel import profile_from

    parse = bench.build_parser().parse_args
    boxed = "Please reason step by step, and put your final answer within \\boxed{}."
    args = parse(["gsm8k", "--channel", "lte", "--v", "5", "--no-plots", "--instruction", boxed])
    args.radio = "lte"  # as main resolves it
    profile = profile_from(args.channel)
    cmd = bench.reproduce_command(args, profile)
    words = shlex.split(cmd)
    assert "\n" not in cmd and words[:2] == ["gelato-bench", "gsm8k"]
    value = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    assert value["--pipeline"] == "off,local,send-ahead"  # the parsed default, resolved
    assert value["--policies"] == bench.DEFAULT_POLICIES and value["--budget-factors"] == bench.BUDGET_FACTORS
    assert value["--limit"] == "50" and value["--max-new-tokens"] == "256" and value["--devices"] == "1"
    assert value["--radio"] == "lte" and value["--one-way-ms"] == "30" and value["--up-mbit"] == "10"
    assert "--no-plots" in words and "--out" not in words and "--data" not in words  # not given: defaults
    again = parse(words[1:])
    assert again.instruction == boxed  # it changes every prompt
    for key in ("policies", "budget_factors", "v", "k_max", "limit", "max_new_tokens", "seed", "device_profile"):
        assert getattr(again, key) == getattr(args, key), key
    assert bench.pipeline_modes(again.pipeline) == bench.pipeline_modes(args.pipeline)
    assert again.radio == "lte" and again.no_plots
    overrides = {k: getattr(again, k) for k in ("one_way_ms", "jitter_ms", "up_mbit", "down_mbit", "loss")}
    assert profile_from(again.channel, **overrides) == profile
    selected = args.policies.split(",")
    assert bench.base_specs(selected, again) == bench.base_specs(selected, args)
    # A loopback run records no impairment parameters (`--channel none` refuses them).
    none = parse(["gsm8k", "--channel", "none", "--pipeline", "both", "--budgets", "0.01"])
    none.radio = "wifi"
    words = shlex.split(bench.reproduce_command(none, profile_from("none")))
    assert "--one-way-ms" not in words and words[words.index("--pipeline") + 1] == "off,local"
    assert words[words.index("--budgets") + 1] == "0.01" and "--budget-factors" not in words


def test_pipeline_stats_from_rounds() -> None:
    base: dict[str, Any] = {"k": 4, "accepted": 4, "emitted": 5, "carried": 0}
    send_ahead = [
        {**base, "sent_ahead": False, "predrafted": 5, "predraft_hit": True},
        {**base, "sent_ahead": True, "predrafted": 5, "predraft_hit": False, "stale_blocks": 2, "wasted_tokens": 10}
        | {"wasted_j": 0.02},
        {**base, "accepted": 1, "emitted": 2, "sent_ahead": False},
        {**base, "k": 0, "accepted": 0, "emitted": 1, "sent_ahead": True, "follow": True},  # empty: apart
    ]
    st = pipeline_stats(send_ahead, 12)
    # Sent ahead: the one verified and the two stale; the empty block is counted apart.
    assert (st["sent_ahead"], st["ahead_verified"], st["stale_blocks"], st["sent_empty"]) == (3, 1, 2, 1)
    assert st["ahead_hit_rate"] == pytest.approx(1 / 3)
    assert st["predraft_rounds"] == 2 and st["predraft_hit_rate"] == 0.5
    assert st["wasted_tokens_per_token"] == pytest.approx(10 / 12) and st["wasted_j_per_token"] == pytest.approx(
        0.02 / 12
    )
    local = [  # a local miss carries no energy estimate: the run's drafting J per drafted token
        {**base, "predrafted": 3, "predraft_hit": False, "e_draft_j": 0.008},
        {**base, "predrafted": 3, "predraft_hit": True, "e_draft_j": 0.008},
        {**base, "carried": 2, "e_draft_j": 0.004},
    ]
    st = pipeline_stats(local, 15)
    assert st["ahead_hit_rate"] is None and st["predraft_hit_rate"] == 0.5
    assert st["wasted_tokens_per_token"] == pytest.approx(3 / 15)
    assert st["wasted_j_per_token"] == pytest.approx(3 * 0.002 / 15)  # 0.02 J / 10 drafted tokens
    no_meter = [{**r, "e_draft_j": float("nan")} for r in local]  # older traces: no e_draft_j at all
    assert pipeline_stats(no_meter, 15)["wasted_j_per_token"] is None
    plain = pipeline_stats([{"k": 2, "accepted": 1, "emitted": 2}], 2)
    assert plain["ahead_hit_rate"] is None and plain["predraft_hit_rate"] is None and plain["wasted_j_per_token"] == 0


def as_written_before_modes(src: Path, dst: Path) -> dict[str, Any]:
    """A copy of the run in `src` as results were written before pipelining was a mode: local
    pre-drafting as `"pipeline": true` and labels `+pipe` (rounds files named after them),
    `"pipeline": false` otherwise, no send-ahead runs."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.png", "outputs.jsonl.gz"))
    summary = json.loads((dst / "summary.json").read_text())
    runs = []
    for r in summary["runs"]:
        if r["pipeline"] == "send-ahead":
            (dst / "rounds" / f"{RunSpec(r['label'], r['policy'], r['family']).slug}.jsonl.gz").unlink()
            continue
        old = r["label"].replace("+local", "+pipe")
        if old != r["label"]:
            rounds = dst / "rounds"
            src_file = rounds / f"{RunSpec(r['label'], r['policy'], r['family']).slug}.jsonl.gz"
            src_file.rename(rounds / f"{RunSpec(old, r['policy'], r['family']).slug}.jsonl.gz")
        runs.append({**r, "label": old, "pipeline": r["pipeline"] == "local"})
    summary["runs"] = runs
    (dst / "summary.json").write_text(json.dumps(summary))
    return summary


def test_results_with_bool_pipeline_still_read(tmp_path: Path) -> None:
    """Results written before pipelining was a mode (`"pipeline": true`, labels `+pipe`): the
    targets, the table, the pipelining figures and the plots are still made from them."""
    from gelato.benchmarks.bench_finish import replot
    from gelato.benchmarks.bench_report import markdown

    src = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gsm8k_lte_n8"
    copy = tmp_path / "old"
    summary = as_written_before_modes(src, copy)
    piped = [r for r in summary["runs"] if r["pipeline"] is True]
    assert piped and all(r["label"].endswith("+pipe") or "+pipe " in r["label"] for r in piped)
    t = targets(summary["runs"], [r for r in summary["references"] if r["policy"] == "oracle"], 8)
    by = {g["label"]: g for g in t["gelato"]}
    assert by["gelato+pipe"]["goal"] == 1.5 and by["gelato"]["goal"] == 1.2
    assert by["gelato+pipe"]["pipeline"] == "local" and by["gelato+pipe"]["unpipelined"] == "gelato"
    assert "gelato+pipe" in markdown({**summary, "targets": t})
    with gzip.open(copy / "rounds" / f"{RunSpec('gelato+pipe', 'gelato', 'gelato').slug}.jsonl.gz") as f:
        rounds = [json.loads(line) for line in f]
    st = pipeline_stats(rounds, sum(r["emitted"] for r in rounds))
    assert st["ahead_hit_rate"] is None and st["predraft_rounds"] > 0  # local pre-drafting, no send-ahead
    assert st["wasted_j_per_token"] > 0  # its rounds recorded e_draft_j: the misses' drafting energy
    assert replot(copy) == 0 and (copy / "pareto.png").stat().st_size > 1000


def test_shards_deal_questions_round_robin(tmp_path: Path) -> None:
    qs = [{"question": f"q{i}"} for i in range(7)]
    paths = shard_files(qs, 3, tmp_path)
    got = [[json.loads(x)["question"] for x in p.read_text().splitlines()] for p in paths]
    assert got == [["q0", "q3", "q6"], ["q1", "q4"], ["q2", "q5"]]
    assert [shard_index(0, i, 3) for i in range(3)] == [0, 3, 6] and shard_index(2, 1, 3) == 5


def test_latency_per_token_weighs_every_token() -> None:
    rounds = [{"emitted": 4, "t_round_s": 0.04}, {"emitted": 1, "t_round_s": 0.05}, {"emitted": 0, "t_round_s": 1.0}]
    lat = token_latencies(rounds)
    assert lat == [0.01] * 4 + [0.05]
    assert percentile(lat, 0.5) == 0.01 and percentile(lat, 0.99) == 0.05 and percentile([], 0.5) is None


def test_edge_ms_per_token_shares_each_forward_among_its_rows() -> None:
    """Two devices whose every verdict came from one forward of both rows: the edge's compute per
    token counts each forward once (the shares), not once per device; a run recorded before the
    shares existed still reads its whole-forward times."""
    recs = [{"device": d, "n_tokens": 50, "elapsed_s": 1.0, "edge_compute_s": 0.2, "edge_share_s": 0.1} for d in (0, 1)]
    res = RunResult(RunSpec("fixed-2", "fixed-2", "fixed"), records=recs)
    assert summarize(res)["edge_compute_s_per_token"] == pytest.approx(0.2 / 100)
    for r in recs:
        del r["edge_share_s"]
    assert summarize(res)["edge_compute_s_per_token"] == pytest.approx(0.4 / 100)


def row(label: str, family: str, tps: float, jpt: float, pipeline: bool | str = False) -> dict[str, Any]:
    return {
        "label": label,
        "policy": label.split()[0],
        "family": family,
        "tokens_per_s": tps,
        "energy_j_per_token": jpt,
        "pipeline": pipeline,
    }


def test_targets() -> None:
    rows = [
        row("fixed-0", "fixed", 10, 0.02),
        row("fixed-2", "fixed", 30, 0.012),
        row("fixed-4", "fixed", 40, 0.010),
        row("gelato", "gelato", 50, 0.009),
        row("gelato+pipe", "gelato", 55, 0.0095, True),  # an older summary: pipeline a bool
        row("gelato+send-ahead", "gelato", 64, 0.0099, "send-ahead"),
        row("heuristic", "heuristic", 9, 0.02),
    ]
    t = targets(rows, [{"label": "oracle K≤8", "k_cap": 8, "tokens_per_s": 60.0}], 8)
    g, gp, sa = t["gelato"]
    assert g["best_fixed"] == "fixed-4" and g["speedup_vs_best_fixed"] == pytest.approx(1.25) and g["met"]
    assert not gp["met"] and gp["goal"] == 1.5  # 1.375x: short of the pipelined goal
    assert gp["speedup_vs_unpipelined"] == pytest.approx(1.1) and not gp["unpipelined_met"]
    assert sa["met"] and sa["goal"] == 1.5 and sa["unpipelined_met"] and sa["pipeline"] == "send-ahead"
    assert "unpipelined_met" not in g
    assert g["oracle_met"] is False and g["vs_oracle"] == pytest.approx(50 / 60)
    assert t["beats_fixed0"] == {
        "fixed-2": True,
        "fixed-4": True,
        "gelato": True,
        "gelato+pipe": True,
        "gelato+send-ahead": True,
        "heuristic": False,
    }
    slow_t = targets([*rows[:3], row("gelato", "gelato", 50, 0.011)], [], 8)
    slow = slow_t["gelato"][0]
    assert not slow["met"] and slow["energy_ratio_vs_best_fixed"] > 1  # faster, but at more J/token
    # No oracle row (--no-oracle): not measured, never "falls short" (it printed "-× None ... FALLS SHORT").
    assert slow["oracle_met"] is None and slow["vs_oracle"] is None
    assert "the oracle: not measured (no oracle row)" in target_lines(slow_t)[0]
    assert (
        "the oracle: not measured" not in target_lines(t)[0] and "(goal ≥ 0.9×): **FALLS SHORT**" in target_lines(t)[0]
    )
    assert "- every speculative run faster than fixed-0: **FALLS SHORT** (heuristic)" in target_lines(t)
    without_f0 = targets(rows[1:], [], 8)  # no fixed-0 run: the check is not made, never "MET"
    assert without_f0["beats_fixed0"] == {}
    assert "- every speculative run faster than fixed-0: not measured (no fixed-0 run)" in target_lines(without_f0)


def test_target_lines_say_no_more_than_was_shown() -> None:
    """A pipelined run is not judged by the oracle (its rounds go one at a time); a ratio just short
    of its goal is not printed as the goal; a run that a fixed K beats at no more J/token says so,
    however it compares with the slower, dearer fixed Ks; with none spending as much, one clause."""
    from gelato.benchmarks.bench_report import ratio_text

    rows = [
        row("fixed-4", "fixed", 40, 0.010),
        row("fixed-8", "fixed", 30, 0.013),
        row("gelato", "gelato", 35, 0.011),
        row("gelato+send-ahead", "gelato", 70, 0.020, "send-ahead"),
    ]
    t = targets(rows, [{"label": "oracle K≤8", "k_cap": 8, "tokens_per_s": 60.0}], 8)
    g, sa = t["gelato"]
    assert sa["oracle_met"] is None and sa["vs_oracle"] == pytest.approx(70 / 60)  # above the "bound"
    lines = target_lines(t)
    assert "1.17× oracle K≤8 (not a bound for a pipelined run" in lines[1] and "MET" not in lines[1].split(";")[2]
    assert g["dominated_by"] == "fixed-4" and sa["dominated_by"] is None
    assert "1.17× fixed-8 (the fastest fixed-K spending at least as much), but fixed-4 is faster" in lines[0]
    assert "Pareto view: no fixed-K spends as much per token;" in lines[1]
    assert "(no fixed-K spends as much) (the fastest" not in "".join(lines)
    assert ratio_text(1.1958, 1.2) == "1.196" and ratio_text(0.8973, 0.9) == "0.897"
    assert ratio_text(1.2, 1.2) == "1.20" and ratio_text(1.31, 1.2) == "1.31" and ratio_text(None, 1.0) == "-"
    assert ratio_text(1.0015, 1.0, at_most=True) == "1.002" and ratio_text(0.9984, 1.0, at_most=True) == "1.00"
    assert ratio_text(1.0, 1.0, at_most=True) == "1.00" and ratio_text(1.0401, 1.0, at_most=True) == "1.04"


def test_budgeted_runs_say_whether_they_kept_their_budget() -> None:
    """Each run with an energy budget: its J/token and its worst device's against ē (within 5 %:
    kept), computed from the questions' own energy; unbudgeted runs get no line."""
    from gelato.benchmarks.bench_report import budget_lines

    def budgeted(label: str, jpt: float, per_device_j: list[tuple[int, float, int]]) -> dict[str, Any]:
        r = row(label, "gelato", 40, jpt)
        r["budget_j_per_token"], r["q_max_j"] = 0.010, 0.5
        r["per_question"] = [{"device": d, "energy_j": j, "n_tokens": n} for d, j, n in per_device_j]
        return r

    kept = budgeted("gelato ē=10.0mJ", 0.0100, [(0, 0.49, 50), (1, 0.51, 50)])
    skewed = budgeted("gelato ē=10.0mJ b", 0.0100, [(0, 0.45, 50), (1, 0.30, 25), (0, 0.10, 25)])
    over = budgeted("lyapunov ē=10.0mJ", 0.0107, [(0, 1.07, 100), (1, None, 0)])  # type: ignore[list-item]
    t = targets([row("fixed-2", "fixed", 30, 0.012), row("gelato", "gelato", 50, 0.011), kept, skewed, over], [], 8)
    by = {b["label"]: b for b in t["budgets"]}
    assert set(by) == {kept["label"], skewed["label"], over["label"]}  # the unbudgeted gelato: none
    assert by[kept["label"]]["kept"] and by[kept["label"]]["worst_device"] == 1
    assert by[kept["label"]]["worst_device_ratio"] == pytest.approx(1.02)
    # The run is on budget, one device is 1.2× over: not kept.
    assert not by[skewed["label"]]["kept"] and by[skewed["label"]]["worst_device_ratio"] == pytest.approx(1.2)
    assert not by[over["label"]]["kept"] and by[over["label"]]["ratio"] == pytest.approx(1.07)
    lines = [x for x in target_lines(t) if "its budget ē" in x]
    assert len(lines) == 3 and lines[0].endswith("**KEPT**") and lines[2].endswith("**OVER BUDGET**")
    # Device 1 reported no energy: one device is left, whose J/token is the run's (no second clause).
    assert "10.70 mJ/token = 1.07× its budget ē = 10.00 mJ/token; peak Q 0.50 J" in lines[2]
    assert "its worst device (device 1) 1.20× ē" in lines[1]
    alone = budgeted("gelato ē=10.0mJ c", 0.0102, [(0, 1.02, 100)])
    (solo,) = targets([alone], [], 8)["budgets"]
    assert solo["kept"] and solo["worst_device"] is None and "worst device" not in budget_lines([solo])[0]
    # The fixed-K runs' own device spread, for scale: no budget there, yet a device over its run.
    fixed = [row("fixed-2", "fixed", 30, 0.012), row("fixed-4", "fixed", 35, 0.011)]
    for r, (j0, j1, n) in zip(fixed, ((0.55, 0.65, 50), (0.99, 1.21, 100)), strict=True):
        r["per_question"] = [{"device": 0, "energy_j": j0, "n_tokens": n}, {"device": 1, "energy_j": j1, "n_tokens": n}]
    scaled = targets([*fixed, kept], [], 8)
    assert scaled["fixed_device_spread"]["min"] == pytest.approx(0.013 / 0.012)
    assert scaled["fixed_device_spread"]["max"] == pytest.approx(0.0121 / 0.011)
    note = "for scale, the fixed-K runs (no budget to keep): their worst device at 1.08–1.10×"
    assert any(note in x for x in target_lines(scaled))
    assert targets([*fixed, row("gelato", "gelato", 50, 0.011)], [], 8)["fixed_device_spread"] is None  # no budget


def test_ar_device_has_no_acceptance_and_each_device_its_own_queue() -> None:
    """ar-device's drafts were checked by no target: no acceptance or mean draft. With several
    devices the final Q and long-run J/token are each device's, not whichever came last."""
    recs = [
        {"question": q, "device": q % 2, "n_tokens": 10, "elapsed_s": 1.0, "accepted": 9, "drafted": 9, "rounds": 1}
        | {"q_deficit_j": 0.1 * q, "long_run_j_per_token": 0.01 * q, "done_at_s": float(q)}
        for q in range(4)
    ]
    one_round = {"k": 9, "accepted": 9, "emitted": 10, "t_round_s": 1.0, "t_net_s": 0.0}
    rounds = [{**one_round, "device": q % 2} for q in range(4)]
    local = summarize(RunResult(RunSpec("ar-device", "ar-device", "ar-device"), recs, rounds, 4.0))
    assert local["acceptance"] is None and local["mean_draft_len"] is None
    fleet = summarize(RunResult(RunSpec("gelato", "gelato", "gelato"), recs, rounds, 4.0))
    assert fleet["acceptance"] == 1.0 and fleet["q_final_j"] is None and fleet["long_run_j_per_token"] is None
    finals = [(d["q_final_j"], d["long_run_j_per_token"]) for d in fleet["per_device"]]
    assert finals == [pytest.approx((0.2, 0.02)), pytest.approx((0.3, 0.03))]
    one = summarize(RunResult(RunSpec("gelato", "gelato", "gelato"), recs[1::2], rounds[1::2], 2.0))
    assert one["q_final_j"] == pytest.approx(0.3)


def test_observed_drafts_stop_at_first_rejection() -> None:
    rows = [
        {"k": 4, "accepted": 1, "entropies": [0.1, 2.0, 3.0, 4.0], "p_accept": [0.9, 0.4, 0.2, 0.1]},
        {"k": 2, "accepted": 2, "entropies": [0.2, 0.3], "p_accept": []},
    ]
    assert observed(rows) == [(0.1, 0.9, 1), (2.0, 0.4, 0), (0.2, None, 1), (0.3, None, 1)]


def test_power_fit_recovers_known_powers() -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(50):
        td, tw = rng.uniform(0.001, 0.01), rng.uniform(0.01, 0.05)
        rows.append({"t_draft_s": td, "t_round_s": td + tw, "e_compute_j": 2.4 * td + 0.6 * tw})
    p_draft, p_wait = bench_refs._powers(rows)
    assert p_draft == pytest.approx(2.4) and p_wait == pytest.approx(0.6)


def test_oracle_never_slower_than_fixed_k() -> None:
    """On synthetic rounds (and the traces they came from) the bound beats every fixed K it was fitted on."""
    from gelato.benchmarks.simulate import Trace, agree_runs

    rng = random.Random(1)
    agree = [[int(rng.random() < 0.7) for _ in range(40)] for _ in range(4)]
    traces = [Trace(tuple([1.0] * 40), agree_runs(a), frozenset(), 40, 10) for a in agree]
    fixed = []
    for k in (1, 3):
        res = RunResult(RunSpec(f"fixed-{k}", f"fixed-{k}", "fixed"))
        for q, a in enumerate(agree):
            pos, t_sum, e_sum = 0, 0.0, 0.0
            while pos < 40:
                kk = min(k, 40 - pos - 1)
                acc = bench_refs_leading(a, pos, kk)
                t = 0.001 * kk + 0.002 + 0.02
                res.rounds.append(
                    {
                        "question": q,
                        "device": 0,
                        "k": kk,
                        "accepted": acc,
                        "emitted": acc + 1,
                        "t_round_s": t,
                        "t_draft_s": 0.001 * kk,
                        "t_net_s": 0.02,
                        "t_edge_compute_s": 0.002,
                        "t_edge_queue_s": 0.0,
                        "bytes_up": 20 + 2 * kk,
                        "bytes_down": 30,
                        "e_compute_j": 2.5 * 0.001 * kk + 0.5 * (t - 0.001 * kk),
                        "e_j": 0.0,
                    }
                )
                res.rounds[-1]["e_j"] = res.rounds[-1]["e_compute_j"]
                t_sum, e_sum, pos = t_sum + t, e_sum + res.rounds[-1]["e_j"], pos + acc + 1
            res.records.append(
                {"question": q, "device": 0, "n_tokens": 40, "elapsed_s": t_sum + 0.01, "energy_j": e_sum + 0.005}
            )
        fixed.append(res)
    o = bench_refs.oracle(traces, fixed, "wifi", 1024, (8,))
    best = max(f["measured_tokens_per_s"] for f in o["fidelity"])
    assert o["rows"][0]["tokens_per_s"] > best
    for f in o["fidelity"]:  # the calibrated model reproduces each run, calibrated on the others
        assert f["held_out"] and f["model_tokens_per_s"] == pytest.approx(f["measured_tokens_per_s"], rel=0.1)
    alone = bench_refs.oracle(traces, fixed[:1], "wifi", 1024, (8,))
    assert [f["held_out"] for f in alone["fidelity"]] == [False]  # nothing else to calibrate on: in-sample


def bench_refs_leading(agree: list[int], start: int, k: int) -> int:
    from gelato.benchmarks.traces import leading_agrees

    return leading_agrees(agree, start, k)


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


def test_round_medians_count_the_rounds_that_read_an_answer() -> None:
    """ar-edge: a round whose token came in the message an earlier round read waited for nothing;
    the policies' round and network medians (and "stalled" rounds, over twice the median) are
    taken over the rounds that read one, or over all where none did (ar-device)."""
    from gelato.benchmarks.policies import trace_stats

    def rnd(t_round_s: float, bytes_down: int) -> dict[str, object]:
        return {
            "t_round_s": t_round_s,
            "t_net_s": t_round_s / 2,
            "bytes_down": bytes_down,
            "k": 0,
            "k_ref": 0,
            "stop_reason": "",
            "q_deficit_j": None,
            "t_draft_s": 0.0,
            "t_edge_compute_s": 0.0,
        }

    chunked = [rnd(0.010, 300), *[rnd(0.0, 0)] * 31, rnd(0.012, 300), *[rnd(0.0, 0)] * 31]
    assert answered_rounds(chunked) == [chunked[0], chunked[32]]
    stats = trace_stats(chunked)
    assert stats["stalled_rounds"] == 0 and stats["t_net_median_ms"] == 5.5
    local = [rnd(0.002, 0)] * 3
    assert answered_rounds(local) == local
