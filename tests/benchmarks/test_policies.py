"""`gelato.benchmarks.policies`: the energy note of its results names the device profile and radio
model the device processes were actually given, not a fixed `phone` + `wifi`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


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
