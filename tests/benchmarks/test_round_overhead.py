"""The round-overhead benchmark (`gelato.benchmarks.round_overhead`) with tiny settings: it runs every phase
(plain processes, the instrumented edge and device, the echo variants, raw forwards, in-process
references) and its output is complete and internally consistent — every hot-path function it
times still exists, the parts of a round sum to the round, timed parts alone stay within it,
differences between nested timers are not negative, and the transit split by the shared clock
agrees with the transit by subtraction. No timing thresholds: speed is the benchmark's job."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from typing import Any

import pytest

from gelato.benchmarks import round_overhead as ro

TOL_MS = 0.05  # the few µs between a write returning and the read starting, timer overheads


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("round_overhead") / "ro"
    cmd = [sys.executable, "-m", "gelato.benchmarks.round_overhead", "--n", "1", "--max-new-tokens", "8"]
    cmd += ["--prompts", "demo", "--echo-rounds", "20", "--raw-reps", "2", "--k", "3", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    md = out.with_suffix(".md").read_text()
    assert "Command: `python -m gelato.benchmarks.round_overhead --n 1" in md and "## Where the overhead" in md
    assert "| target forward (model) | edge |" in md
    assert "- fixed-0 with `--pipeline send-ahead`" in md and "- fixed-3 with `--pipeline send-ahead`" in md
    if sys.platform.startswith("linux"):
        assert "- Edge CPU ms per token in the plain runs, by thread" in md
    data: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())
    return data


def test_every_hot_path_function_was_timed_and_output_is_lossless(result: dict[str, Any]) -> None:
    meta = result["meta"]
    assert meta["not_instrumented"] == [], "the real code was renamed: update benchmarks/round_overhead.py"
    assert meta["k"] == 3 and meta["n"] == 1 and meta["threads_per_process"] == 1
    assert meta["machine"] and meta["command"].startswith("python -m gelato.benchmarks.round_overhead")
    assert result["lossless"] is True
    assert list(result["policies"]) == ["fixed-0", "fixed-3"]


def test_round_parts_are_consistent(result: dict[str, Any]) -> None:
    for name, p in result["policies"].items():
        comps = p["components"]
        assert [c["key"] for c in comps] == [key for key, *_ in ro.COMPONENTS]
        assert p["rounds"] > 0 and p["round_ms"] > 0 and 0 <= p["outlier_rounds_dropped"] < p["rounds"]
        assert p["every_round"]["p10_ms"] <= p["every_round"]["p50_ms"] <= p["every_round"]["max_ms"]
        assert math.isclose(sum(c["ms"] for c in comps), p["round_ms"], rel_tol=1e-9, abs_tol=1e-9), name
        timed = sum(c["ms"] for c in comps if c["kind"] != "residual")
        assert timed <= p["round_ms"] * (1 + 1e-9), name
        for c in comps:
            assert c["ms"] >= -TOL_MS, (name, c)
        by_key = {c["key"]: c["ms"] for c in comps}
        assert by_key["model_forward"] > 0
        assert (by_key["draft_forward"] > 0) == (name != "fixed-0")
        assert p["outside_models_ms"] == pytest.approx(p["round_ms"] - p["model_ms"])
        assert p["edge_handler_ms"] <= p["round_ms"]
        assert p["uplink_ms"] >= 0 and p["downlink_ms"] >= 0
        assert p["uplink_ms"] + p["downlink_ms"] == pytest.approx(by_key["transit"], abs=TOL_MS, rel=0.1)
        assert p["edge_cpu_ms_per_verdict"] > 0 and p["device_cpu_ms_per_round"] > 0
        assert p["floor_ms"] > 0 and p["plain_round_ms"] > 0 and p["plain_tokens_per_s"] > 0
        # Like with like: the loop timer over every round (the plain run drops none), not without
        # the rounds dropped as preempted (that read 0.93× in a committed run: timers that sped the loop up).
        every = p["every_round"]["loop_timer_mean_ms"]
        assert p["instrumentation_inflation"] == pytest.approx(every / p["plain_round_ms"])
        assert [c["key"] for c in ro.ranked_overhead(p)] == [
            c["key"] for c in sorted(comps, key=lambda c: -c["ms"]) if c["kind"] != "model"
        ]


def test_floors_and_references(result: dict[str, Any]) -> None:
    floors = result["floors"]
    assert set(floors["echo"]) == set(ro.ECHO_VARIANTS)
    assert all(v["median_ms"] > 0 and v["rounds"] == 20 for v in floors["echo"].values())
    for key in ("drafter_1_ms", "drafter_k_ms", "target_1_ms", "target_k1_ms", "target_pool_1_ms"):
        assert floors[key] > 0
    refs = result["references"]
    assert {*refs["target"], *refs["assisted"]} == {"loop", "generate", "k3", "defaults"}
    assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values())
    assert {len(v) for v in result["ratios_per_repeat"].values()} == {result["meta"]["repeats"]}
    assert set(result["ratios_of_best"]) == set(result["ratios"])
    ahead = result["pipelined"]["fixed-0 send-ahead"]  # its tokens are checked by `lossless`
    assert (
        ahead["tokens_per_s"] > 0
        and ahead["same_output_every_repeat"]
        and "fixed0_ahead_vs_target_loop" in result["ratios"]
    )
    # ar-edge: the edge decoding alone, streamed, several tokens a message and one; tokens: `lossless`
    for streamed in (result["streamed"], result["streamed_each"]):
        assert streamed["tokens_per_s"] > 0 and streamed["same_output_every_repeat"]
    assert {"ar_edge_vs_target_loop", "ar_edge_each_vs_target_loop", "ar_edge_vs_ar_edge_each"} <= set(result["ratios"])
    assert result["meta"]["stream_tokens"] == 32
    # Drafted blocks sent ahead too (fixed-K, gelato), against assisted generation; tokens: `lossless`.
    for name in ("fixed-3 send-ahead", "gelato send-ahead"):
        run = result["pipelined"][name]
        assert run["tokens_per_s"] > 0 and run["rounds"] > 0 and run["same_output_every_repeat"], name
    assert {"fixedk_ahead_vs_assisted_k", "gelato_ahead_vs_assisted_defaults"} <= set(result["ratios"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU time comes from /proc")
def test_edge_cpu_by_thread(result: dict[str, Any]) -> None:
    """The plain runs' edge CPU split by thread: the model thread is found by its OS name (else its
    time would land in "other" and read 0 here). /proc counts in clock ticks (10 ms): this tiny run's
    event loop may stay under one."""
    runs = {n: p["plain_edge_cpu_ms_per_token"] for n, p in result["policies"].items()}
    runs["fixed-0 send-ahead"] = result["pipelined"]["fixed-0 send-ahead"]["edge_cpu_ms_per_token"]
    runs["ar-edge"] = result["streamed"]["edge_cpu_ms_per_token"]
    runs["ar-edge one a message"] = result["streamed_each"]["edge_cpu_ms_per_token"]
    for name, cpu in runs.items():
        assert set(cpu) == {"model", "loop", "other"}, name
        assert cpu["model"] > 0 and cpu["loop"] >= 0 and cpu["other"] >= 0, (name, cpu)
    alone = result["references"]["model_thread_alone"]
    assert alone["tokens"] > 0 and alone["cpu_ms_per_token"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names and CPU time come from /proc")
def test_thread_cpu_finds_a_named_thread() -> None:
    import os
    import threading
    import time

    from gelato.benchmarks.procs import thread_cpu_s
    from gelato.edge.model_thread import name_os_thread

    stop = threading.Event()

    def burn() -> None:  # at least 0.3 s of CPU, and until it has been seen burning
        name_os_thread("gelato-burn")
        end = time.thread_time() + 0.3
        while time.thread_time() < end or not stop.is_set():
            pass

    before = thread_cpu_s(os.getpid(), model_thread="gelato-burn")
    t = threading.Thread(target=burn)
    t.start()
    # Alive and named: its own line in /proc, once the kernel has charged it a tick (on a busy
    # machine 0.1 s of waiting could see none: the test failed under load).
    deadline = time.monotonic() + 30
    during = thread_cpu_s(os.getpid(), model_thread="gelato-burn")
    while during.get("model", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        during = thread_cpu_s(os.getpid(), model_thread="gelato-burn")
    stop.set()
    t.join()
    after = thread_cpu_s(os.getpid(), model_thread="gelato-burn")
    while after.get("model", 0) > 0 and time.monotonic() < deadline:  # the OS thread exits just after join
        time.sleep(0.05)
        after = thread_cpu_s(os.getpid(), model_thread="gelato-burn")
    assert before["model"] == 0 and during["model"] > 0
    # Once it ended, its time is still the process's: counted as "other", never lost.
    assert after["model"] == 0 and after["other"] - before["other"] >= 0.25
    assert thread_cpu_s(2**22 + 12345) == {}  # no such process


def test_decompose_sums_nested_timers() -> None:
    """Synthetic rounds: each component is what the nesting says, and they add up to the round."""
    device = {"total": 10.0, "offload": 6.0, "draft": 4.0, "draft_forward": 3.0, "entropy": 0.5, "apply": 1.0}
    device |= {"encode": 0.1, "write": 0.2, "read": 3.0, "decode": 0.1, "calls": 9}
    edge = {"total": 2.5, "parse": 0.1, "decode_block": 0.1, "check_loop": 0.05, "batcher_verify": 2.0}
    edge |= {"model_thread": 1.8, "pooled_forward": 1.5, "model_forward": 1.2, "accept": 0.2}
    edge |= {"check_model_thread": 0.05, "encode_verdict": 0.1, "calls": 9}
    out = ro.decompose([device], [edge])
    parts = {c["key"]: c["ms"] / 1e3 for c in out["components"]}
    assert sum(parts.values()) == pytest.approx(10.0)
    assert parts["hops"] == pytest.approx(1.0) and parts["transit"] == pytest.approx(0.7)
    assert parts["queue"] == pytest.approx(0.2) and parts["pool"] == pytest.approx(0.3)
    assert parts["loop"] == pytest.approx(0.6) and parts["handler_other"] == pytest.approx(0.15)
    assert out["timed_calls_per_round"] == 18
    # Drafting and applying on the loop's thread (no forward to run): outside the hops, in their rows.
    inline = device | {"offload": 4.5, "apply": 0.0, "apply_inline": 1.0, "draft_inline": 0.5, "draft": 3.5}
    parts = {c["key"]: c["ms"] / 1e3 for c in ro.decompose([inline], [edge])["components"]}
    assert sum(parts.values()) == pytest.approx(10.0)
    assert parts["hops"] == pytest.approx(1.0) and parts["loop"] == pytest.approx(0.6)
    assert parts["apply"] == pytest.approx(1.0) and parts["draft_other"] == pytest.approx(0.5)


def test_patches_wrap_and_restore_every_kind_of_attribute() -> None:
    class Owner:
        @staticmethod
        def static(x: int) -> int:
            return x + 1

        def method(self, x: int) -> int:
            return x * 2

    module = types.ModuleType("fake")
    module.fn = lambda x: x - 1  # type: ignore[attr-defined]
    obj = Owner()
    rec, patches = ro.Recorder(), ro.Patches()
    for owner, attr in ((Owner, "static"), (Owner, "method"), (module, "fn"), (obj, "method"), (Owner, "gone")):
        patches.time(owner, attr, rec, attr)
    rec.open(0.0)
    assert (Owner.static(1), obj.method(2), module.fn(3)) == (2, 4, 2)
    assert rec.current is not None and rec.current["calls"] == 4  # obj.method: instance + class wrapper
    assert patches.missing == ["Owner.gone"]
    patches.restore()
    assert "method" not in vars(obj) and Owner.static(1) == 2 and "static" in vars(Owner)
    assert not hasattr(Owner.method, "__wrapped__") and not hasattr(module.fn, "__wrapped__")


def test_lossless_compares_every_repeat_of_every_run() -> None:
    """One repeat of one run that differs from fixed-0's output fails the verdict (the rule
    a816a5f introduced, here as a function with a test of its own)."""
    same = {"token_ids": [[5, 6, 7]]}
    acc = {"fixed-0": [same, same], "fixed-3": [same, same], "ar-edge": [same, same]}
    assert ro.lossless(acc, ["fixed-0", "fixed-3", "ar-edge"])
    for run in acc:
        for repeat in range(2):
            bad = {k: list(v) for k, v in acc.items()}
            bad[run][repeat] = {"token_ids": [[5, 6, 8]]}
            assert not ro.lossless(bad, ["fixed-0", "fixed-3", "ar-edge"]), (run, repeat)


def test_prompts_come_from_the_data_file_given(tmp_path: Any) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answer": "#### 1"}) + "\n" for i in range(3)))
    assert ro.load_prompts("gsm8k", 2, data) == (["q0?", "q1?"], "GSM8K test")
    assert ro.load_prompts("demo", 2, data)[1] == "the demo's synthetic problems"
    with pytest.raises(SystemExit):  # a --data that is not there is refused, not replaced by the demo's prompts
        ro.main(["--data", str(tmp_path / "none.jsonl")])
