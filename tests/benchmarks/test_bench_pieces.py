"""The pieces `gelato-bench gsm8k` is made of: GSM8K scoring, the plan and pipeline modes, the recorded
command, results written before pipelining was a mode, pipelining and per-device statistics, sharding,
latency percentiles, round medians, and the oracle's cost fit."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest

from gelato.benchmarks import bench, bench_refs
from gelato.benchmarks.bench_plots import observed
from gelato.benchmarks.bench_report import gsm8k_answer, score, targets
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


def test_markdown_headings_are_no_answer_and_unscored_questions_are_left_out() -> None:
    """An instruct model's `#### 1. Eggs per day` heading is a section, not GSM8K's mark (it was read
    as the answer 1 over the \\boxed{18} that follows); the mark's number is on its line; a
    question without a gold number is unscored, not wrong."""
    steps = "#### 1. Eggs per day\n16 - 3 - 4 = 9\n#### 2. Revenue\n9 * 2 = 18\nThe final answer is \\boxed{18}."
    assert gsm8k_answer(steps) == 18.0
    assert gsm8k_answer("####\n\n7") is None
    assert gsm8k_answer("#### 18. So she makes 18 dollars.") == 18.0  # one mark: the answer, as always
    assert gsm8k_answer("#### 1) Eggs\n#### 2) Sales\nSo the answer is 18.") == 18.0
    assert gsm8k_answer("#### 1. Eggs\n9 eggs\n#### 18") == 18.0 and gsm8k_answer("#### 12.") == 12.0
    assert gsm8k_answer("#### 18, as computed") == 18.0 and gsm8k_answer("#### 1,500") == 1500.0
    recs = [{"question": 0, "text": "#### 3"}, {"question": 1, "text": "#### 4"}, {"question": 2, "text": "#### 5"}]
    assert score(recs, [3.0, None, 6.0]) == 0.5
    assert [r["correct"] for r in recs] == [True, None, False]
    assert score(recs[1:2], [3.0, None, 6.0]) is None


def test_a_lone_heading_gives_way_to_the_answer_the_text_gives() -> None:
    """One `#### 1. Eggs per day` heading was read as the answer 1 over the \\boxed{18} below it
    (headings were skipped only where a text had several marks)."""
    assert gsm8k_answer("#### 1. Eggs per day\n16 - 3 - 4 = 9\n9 * 2 = \\boxed{18}") == 18.0
    assert gsm8k_answer("#### 2) Money\n The answer is 18") == 18.0
    assert gsm8k_answer("#### 18. So she makes 18 dollars.") == 18.0  # no other answer: the mark's
    assert gsm8k_answer("#### 1. Eggs\n#### 2. Sales\nnothing") is None


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
