"""`gelato.benchmarks.policies`: the energy note of its results names the device profile and radio
model the device processes were actually given, not a fixed `phone` + `wifi`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


def test_energy_note_follows_device_profile_and_radio() -> None:
    from gelato.benchmarks.policies import Bench, RunSpec, build_parser, energy_note

    args = build_parser().parse_args(["--device-profile", "laptop", "--radio", "lte", "--data", "q.jsonl"])
    note = energy_note(args.device_profile, args.radio)
    assert note == "device energy: cpu-model (estimated) laptop profile + lte radio model, not a measurement"
    # The note and the devices' flags come from the same arguments.
    bench = object.__new__(Bench)  # no edge, no proxy: only the command line is built
    bench.args, bench.device_prefix, bench.proxy = args, [], SimpleNamespace(address="127.0.0.1:1")
    cmd = bench.device_cmd(RunSpec("fixed-2", "fixed-2", "fixed"), Path("t.jsonl"))
    assert cmd[cmd.index("--meter") + 1] == "cpu-model"
    assert cmd[cmd.index("--device-profile") + 1] == "laptop" and cmd[cmd.index("--radio") + 1] == "lte"
    # The defaults give the note the committed results carry.
    d = build_parser().parse_args([])
    assert energy_note(d.device_profile, d.radio) == (
        "device energy: cpu-model (estimated) phone profile + wifi radio model, not a measurement"
    )
    assert energy_note("jetson-orin-nano", "none") == (
        "device energy: cpu-model (estimated) jetson-orin-nano profile + no radio model, not a measurement"
    )


def test_speed_probe_and_its_column() -> None:
    """The per-run machine-speed probe: drafter ms per drafted token, edge compute ms per verified
    row (drafts + the target's token), from the trace; None where nothing was drafted; shown in
    the run table."""
    from gelato.benchmarks.policies import run_table, speed_probe

    rounds = [
        {"k": 4, "t_draft_s": 0.006, "t_edge_compute_s": 0.0055},
        {"k": 2, "t_draft_s": 0.003, "t_edge_compute_s": 0.004},
    ]
    probe = speed_probe(rounds)
    assert probe == {"draft_ms_per_token": pytest.approx(1.5), "edge_ms_per_row": pytest.approx(1.1875)}
    empty = speed_probe([{"k": 0, "t_draft_s": 0.0, "t_edge_compute_s": 0.003}])
    assert empty == {"draft_ms_per_token": None, "edge_ms_per_row": pytest.approx(3.0)}
    run = {"label": "fixed-4", "tokens_per_s": 10.0, "energy_j_per_token": 0.01, "long_run_j_per_token": None}
    run |= {"q_final_j": None, "acceptance": 0.5, "mean_draft_len": 3.0, "rounds": 2, "tokens_per_round": 3.0}
    header, rule, row = run_table([{**run, **probe}])
    assert header.count("|") == rule.count("|") == row.count("|")
    assert "| 1.50 · 1.19 |" in row
