"""Energy meters read from files or modelled, by the real meter code: RAPL on fake sysfs trees, replayed
traces, the CPU-time estimate, the null meter and the radio model. Jetson rails and the power integrator are
in test_power_jetson.py, NVML and `auto` in test_power_nvml.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from gelato.device.energy import EnergyAccountant
from gelato.power import CpuModelMeter, MeterUnavailable, NullMeter, open_meter, radio_profile
from gelato.power.rapl import RaplMeter
from gelato.power.replay import ReplayMeter
from gelato.types import DraftBlock, Verdict


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


# ---- RAPL ---------------------------------------------------------------------------------


def rapl_tree(root: Path, zones: dict[str, tuple[int, int]], names: dict[str, str] | None = None) -> None:
    """Zones as the kernel writes them; `name` is `package-N` for `intel-rapl:N`, `core` for subzones."""
    for zone, (energy, max_range) in zones.items():
        default = f"package-{zone.split(':')[1]}" if zone.count(":") == 1 else "core"
        write(root / zone / "name", (names or {}).get(zone, default))
        write(root / zone / "energy_uj", energy)
        write(root / zone / "max_energy_range_uj", max_range)


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    rapl_tree(tmp_path, {"intel-rapl:0": (900, 1000), "intel-rapl:0:0": (5, 1000), "intel-rapl:1": (10, 10**6)})
    meter = RaplMeter(tmp_path, clock=FakeClock())  # these tiny ranges wrap in microseconds at real power
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]  # subzone not double counted
    assert meter.joules() == 0.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 950)
    write(tmp_path / "intel-rapl:1" / "energy_uj", 30)
    assert meter.joules() == pytest.approx(70e-6)
    write(tmp_path / "intel-rapl:0" / "energy_uj", 49)  # wrapped: 950 -> 1000 -> 0 -> 49 = 100 uJ
    assert meter.joules() == pytest.approx(170e-6)
    write(tmp_path / "intel-rapl:0:0" / "energy_uj", 999_999)
    assert meter.joules() == pytest.approx(170e-6)


def test_rapl_adds_dram_which_is_outside_the_package(tmp_path: Path) -> None:
    """A server's DRAM domain (subzone `dram`) is not inside its package counter: it is added,
    with its own wraparound; `core` (inside the package) is not; a `dram` alone is no meter."""
    zones = {"intel-rapl:0": (100, 10**6), "intel-rapl:0:0": (50, 1000), "intel-rapl:0:1": (7, 10**6)}
    rapl_tree(tmp_path, zones, names={"intel-rapl:0:0": "dram"})
    meter = RaplMeter(tmp_path, clock=FakeClock())
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:0:0"]
    write(tmp_path / "intel-rapl:0" / "energy_uj", 300)
    write(tmp_path / "intel-rapl:0:0" / "energy_uj", 20)  # wrapped: 50 -> 1000 -> 0 -> 20 = 971 uJ
    write(tmp_path / "intel-rapl:0:1" / "energy_uj", 999)
    assert meter.joules() == pytest.approx((200 + 971) * 1e-6)
    only_dram = tmp_path / "only"
    rapl_tree(only_dram, {"intel-rapl:0:0": (1, 1000)}, names={"intel-rapl:0:0": "dram"})
    with pytest.raises(MeterUnavailable):
        RaplMeter(only_dram, clock=FakeClock())


def test_rapl_read_failing_mid_run_is_nan_then_exact_again(tmp_path: Path) -> None:
    """A counter that cannot be read mid-run (one zone of two) reads NaN and advances no zone: the
    next good read counts everything since the last one (it raised, with the first zone advanced)."""
    rapl_tree(tmp_path, {"intel-rapl:0": (100, 10**6), "intel-rapl:1": (10, 10**6)})
    meter = RaplMeter(tmp_path, clock=FakeClock())
    write(tmp_path / "intel-rapl:0" / "energy_uj", 400)
    (tmp_path / "intel-rapl:1" / "energy_uj").unlink()
    assert math.isnan(meter.joules())
    write(tmp_path / "intel-rapl:0" / "energy_uj", 600)
    write(tmp_path / "intel-rapl:1" / "energy_uj", 30)
    assert meter.joules() == pytest.approx(520e-6)


RANGE_UJ = 262_143_328_850  # max_energy_range_uj of most Intel parts (~262 kJ)


def test_rapl_reset_counter_is_a_new_epoch_not_a_wrap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A counter that goes back because it was reset (driver reload, resume from suspend) is no
    wrap: adding the whole range invented ~62 kJ in one second here. The energy across the reset
    is unknown (a new epoch, `since()` NaN) and exact again after it; a real wrap still counts."""
    import logging

    rapl_tree(tmp_path, {"intel-rapl:0": (200_000_000_000, RANGE_UJ)})
    write(tmp_path / "intel-rapl:0" / "constraint_0_max_power_uw", 125_000_000)  # TDP 125 W: 500 W plausible
    write(tmp_path / "intel-rapl:0" / "constraint_1_max_power_uw", 0)  # no limit stated: ignored
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    before = meter.read()
    clock.t += 1.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 5_000_000)  # reset, then 5 J
    with caplog.at_level(logging.DEBUG, logger="gelato.power.rapl"):
        reset = meter.read()
        assert reset.joules == 0.0 and math.isnan(reset.since(before))  # not 62 kJ
        clock.t += 1.0
        write(tmp_path / "intel-rapl:0" / "energy_uj", 35_000_000)
        after = meter.read()
        assert after.since(reset) == pytest.approx(30.0)  # exact again from the reset on
        write(tmp_path / "intel-rapl:0" / "energy_uj", 1_000_000)  # a second reset: said at DEBUG only
        clock.t += 1.0
        assert math.isnan(meter.read().since(after))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "a reset" in warned[0].getMessage() and "intel-rapl:0" in warned[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "a reset" in r.getMessage() for r in caplog.records)
    assert meter.max_power_w == [500.0]
    write(tmp_path / "intel-rapl:0" / "energy_uj", RANGE_UJ - 40_000_000)
    meter = RaplMeter(tmp_path, clock=clock)
    top = meter.read()
    write(tmp_path / "intel-rapl:0" / "energy_uj", 60_000_000)  # a real wrap: 100 J in 1 s
    clock.t += 1.0
    assert meter.read().since(top) == pytest.approx(100.0 + 1e-6)  # the counter counts 0 after the range


def test_rapl_reads_too_far_apart_may_hide_wraps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Reads further apart than half a wrap period at the plausible peak power may hide whole
    wraps (a counter that wrapped once and went past its old value looks like a small step): the
    energy across such a gap is unknown (NaN), not the small step. The period follows the zone's
    stated limits (4x), else 1000 W."""
    import logging

    rapl_tree(tmp_path, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)  # no stated limit: 1000 W, a wrap in 262 s
    start = meter.read()
    clock.t += 120.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 11_000_000)
    within = meter.read()
    assert within.since(start) == pytest.approx(10.0)  # 120 s apart: fine
    clock.t += 200.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 21_000_000)  # 10 J more, or 10 J + one whole wrap?
    with caplog.at_level(logging.WARNING, logger="gelato.power.rapl"):
        gap = meter.read()
    assert math.isnan(gap.since(within)) and math.isnan(gap.since(start))
    assert "cannot wrap unseen" in caplog.text
    clock.t += 1.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 22_000_000)
    assert meter.read().since(gap) == pytest.approx(1.0)  # exact again after it
    assert meter.max_gap_s == pytest.approx(RANGE_UJ / 1e6 / 1000 / 2, rel=1e-6)
    limited = tmp_path / "limited"
    rapl_tree(limited, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    write(limited / "intel-rapl:0" / "constraint_0_max_power_uw", 15_000_000)  # a 15 W laptop part
    write(limited / "intel-rapl:0" / "constraint_1_max_power_uw", 55_000_000)  # PL2 55 W: 220 W plausible
    meter = RaplMeter(limited, clock=clock)
    start = meter.read()
    clock.t += 200.0
    write(limited / "intel-rapl:0" / "energy_uj", 11_000_000)
    assert meter.read().since(start) == pytest.approx(10.0)  # 200 s is well within a wrap at 220 W


def test_rapl_keeper_reads_between_callers_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real clock a keeper thread reads the counters on its own (a caller reading seldom,
    a long probe window, must not hide a wrap), and `close()` stops it."""
    import time

    import gelato.power.rapl as rapl

    monkeypatch.setattr(rapl, "KEEP_MIN_S", 0.01)
    monkeypatch.setattr(rapl, "KEEP_MAX_S", 0.02)
    monkeypatch.setattr(rapl, "COUNTING_PROBE_S", 0)  # a static tree: not the frozen-counter check
    rapl_tree(tmp_path, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    meter = RaplMeter(tmp_path)
    try:
        start = meter.read()
        write(tmp_path / "intel-rapl:0" / "energy_uj", 3_000_000)
        deadline = time.monotonic() + 5.0
        while meter._last != [3_000_000] and time.monotonic() < deadline:  # no caller reads meanwhile
            time.sleep(0.01)
        assert meter._last == [3_000_000]
        assert meter.read().since(start) == pytest.approx(2.0)  # counted once, by whichever read saw it
    finally:
        meter.close()
    assert meter._keeper is not None and not meter._keeper.is_alive()
    assert RaplMeter(tmp_path, clock=FakeClock())._keeper is None  # a fake clock: reads only when asked


def test_rapl_counts_package_zones_only_not_psys(tmp_path: Path) -> None:
    # A laptop: psys (the whole platform) already contains package-0, so adding it double counts.
    zones = {"intel-rapl:0": (1_000_000, 10**9), "intel-rapl:1": (1_000_000, 10**9)}
    rapl_tree(tmp_path, zones, names={"intel-rapl:1": "psys"})
    meter = RaplMeter(tmp_path, clock=FakeClock())
    assert [z.name for z in meter.zones] == ["intel-rapl:0"]
    write(tmp_path / "intel-rapl:0" / "energy_uj", 2_000_000)  # 1 J in the package
    write(tmp_path / "intel-rapl:1" / "energy_uj", 2_500_000)  # 1.5 J on the platform, that 1 J included
    assert meter.joules() == pytest.approx(1.0)
    # Multi-die parts name their top-level zones package-P-die-D. Intel's count each die apart:
    # each is counted once.
    dies = tmp_path / "dies"
    die_names = {"intel-rapl:0": "package-0-die-0", "intel-rapl:1": "package-0-die-1"}
    rapl_tree(dies, {"intel-rapl:0": (1_000_000, 10**9), "intel-rapl:1": (3_000_017, 10**9)}, names=die_names)
    assert [z.name for z in RaplMeter(dies, clock=FakeClock()).zones] == ["intel-rapl:0", "intel-rapl:1"]
    # Multi-die AMD parts: every die zone reads the one socket counter, the same value at the same
    # time: counted once (summed, a 60 W package read 120 W).
    mirrored = tmp_path / "mirrored"
    mirrored_zones = {"intel-rapl:0": (5_000_000, 10**9), "intel-rapl:1": (5_000_000, 10**9)}
    mirrored_zones |= {"intel-rapl:0:0": (7, 10**9), "intel-rapl:1:0": (7, 10**9)}  # and their dram, mirrored
    dram = {"intel-rapl:0:0": "dram", "intel-rapl:1:0": "dram"}
    rapl_tree(mirrored, mirrored_zones, names=die_names | dram)
    meter = RaplMeter(mirrored, clock=FakeClock())
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:0:0"]
    for zone in ("intel-rapl:0", "intel-rapl:1"):
        write(mirrored / zone / "energy_uj", 65_000_000)
    assert meter.joules() == pytest.approx(60.0)
    only_psys = tmp_path / "psys"
    rapl_tree(only_psys, {"intel-rapl:0": (1, 1000)}, names={"intel-rapl:0": "psys"})
    with pytest.raises(MeterUnavailable, match="no RAPL package zones"):
        RaplMeter(only_psys)


def test_rapl_counters_that_do_not_move_are_no_meter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package never draws 0 W: counters frozen at the meter's start (some VMs expose such) would
    read 0 J as measured; the meter refuses them, so `auto` moves on to an estimate. Counters
    that move (a real package, ~every ms) pass."""
    import threading

    import gelato.power.rapl as rapl

    monkeypatch.setattr(rapl, "COUNTING_PROBE_S", 0.05)
    rapl_tree(tmp_path, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    with pytest.raises(MeterUnavailable, match=r"did not move in 0.05 s: frozen"):
        RaplMeter(tmp_path)
    monkeypatch.setattr(rapl, "COUNTING_PROBE_S", 5.0)
    moved = threading.Timer(0.02, write, (tmp_path / "intel-rapl:0" / "energy_uj", 1_000_500))
    moved.start()
    meter = RaplMeter(tmp_path)
    moved.join()
    try:
        assert meter._last == [1_000_500]  # counting from the counter as the check left it
        write(tmp_path / "intel-rapl:0" / "energy_uj", 1_500_500)
        assert meter.joules() == pytest.approx(0.5)
    finally:
        meter.close()


def test_rapl_missing_or_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MeterUnavailable, match="no RAPL package zones"):
        RaplMeter(tmp_path / "none")
    # A zone stating no range (some older systems): no wrap could be told from a reset, and every
    # read was a new epoch (NaN energy for the whole run under a "measured" label).
    rangeless = tmp_path / "rangeless"
    rapl_tree(rangeless, {"intel-rapl:0": (1, 0)})
    with pytest.raises(MeterUnavailable, match=r"intel-rapl:0 .* no max_energy_range_uj"):
        RaplMeter(rangeless)
    rapl_tree(tmp_path, {"intel-rapl:0": (1, 1000)})

    def denied(zone: Path) -> int:
        raise PermissionError(13, "Permission denied", str(zone / "energy_uj"))

    monkeypatch.setattr(RaplMeter, "_counter", staticmethod(denied))
    with pytest.raises(MeterUnavailable, match="root-only"):
        RaplMeter(tmp_path)


# ---- replay, cpu-model, NaN ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_replay_meter(tmp_path: Path, fmt: str) -> None:
    samples = [(0.0, 2.0), (1.0, 4.0), (3.0, 4.0)]
    path = tmp_path / f"trace.{fmt}"
    if fmt == "csv":
        path.write_text("t_s,power_w\n" + "".join(f"{t},{p}\n" for t, p in samples))
    else:
        path.write_text("".join(f'{{"t_s": {t}, "power_w": {p}}}\n' for t, p in samples))
    clock = FakeClock()
    meter = ReplayMeter(path, clock=clock)
    assert meter.joules() == 0.0
    clock.t += 0.5
    assert meter.joules() == pytest.approx(0.5 * (2.0 + 3.0) / 2)
    clock.t += 2.5
    assert meter.joules() == pytest.approx(3.0 + 8.0)
    clock.t += 1.0  # past the end: holds the last power
    assert meter.joules() == pytest.approx(15.0)
    path.write_text("t_s,power_w\n1,2\n")
    with pytest.raises(MeterUnavailable, match=">= 2 samples"):
        ReplayMeter(path)


def test_replay_trace_blank_lines_and_bad_samples(tmp_path: Path) -> None:
    """A blank line is no sample (a JSONL trace with one raised JSONDecodeError); a sample that is
    not two finite numbers is refused naming the trace (a NaN t_s passed the increasing check
    and every reading was NaN; a missing key or a word raised a bare KeyError/ValueError)."""
    path = tmp_path / "trace.jsonl"
    path.write_text('{"t_s": 0, "power_w": 2}\n\n{"t_s": 1, "power_w": 4}\n\n')
    assert ReplayMeter(path).trace == [(0.0, 2.0), (1.0, 4.0)]
    for text, needle in [
        ('{"t_s": 0, "power_w": 2}\n{"t_s": NaN, "power_w": 4}\n{"t_s": 2, "power_w": 4}\n', "finite"),
        ("t_s,power_w\n0,2\nnan,3\n2,4\n", "finite"),
        ('{"t_s": 0, "power_w": 2}\n{"t": 1, "power_w": 4}\n', "needs numbers t_s and power_w"),
        ("t_s,power_w\n0,2\n1,lots\n", "needs numbers t_s and power_w"),
    ]:
        path.write_text(text)
        with pytest.raises(MeterUnavailable, match=needle):
            ReplayMeter(path)


def test_replay_trace_refuses_negative_power(tmp_path: Path) -> None:
    """A negative sample made the replayed energy run backwards (`since` read -0.25 J) where the
    live meters clip at 0 W; the trace is refused, naming the value."""
    path = tmp_path / "trace.csv"
    path.write_text("t_s,power_w\n0,1\n1,-1.5\n2,1\n")
    with pytest.raises(MeterUnavailable, match=r"power_w must be >= 0, got -1.5"):
        ReplayMeter(path)


def test_replay_trace_declares_its_kind(tmp_path: Path) -> None:
    """A trace says whether a real meter recorded it (`kind` column or key); one that does not is
    `estimated`, so `--meter replay:FILE` on a made-up trace no longer reports measured energy.
    Mixed or unknown kinds are refused naming the file; an explicit `kind=` wins."""
    csv_path, jsonl_path = tmp_path / "trace.csv", tmp_path / "trace.jsonl"

    def jsonl(*kinds: str | None) -> str:  # one sample per kind, None: no key
        rows = [{"t_s": t, "power_w": 2 + 2 * t} | ({"kind": k} if k else {}) for t, k in enumerate(kinds)]
        return "".join(json.dumps(row) + "\n" for row in rows)

    csv_path.write_text("t_s,power_w\n0,2\n1,4\n")
    assert ReplayMeter(csv_path).kind == "estimated"
    assert open_meter(f"replay:{csv_path}").read().kind == "estimated"
    assert ReplayMeter(csv_path, kind="measured").kind == "measured"
    csv_path.write_text("t_s,power_w,kind\n0,2,measured\n1,4,measured\n")
    assert open_meter(f"replay:{csv_path}").read().kind == "measured"
    assert ReplayMeter(csv_path, kind="estimated").kind == "estimated"
    jsonl_path.write_text(jsonl("estimated", "estimated"))
    assert ReplayMeter(jsonl_path).kind == "estimated"
    jsonl_path.write_text(jsonl("measured", "measured"))
    assert ReplayMeter(jsonl_path).kind == "measured"
    for path, text, needle in [
        (csv_path, "t_s,power_w,kind\n0,2,measured\n1,4,estimated\n", "same on every sample"),
        (csv_path, "t_s,power_w,kind\n0,2,measured\n1,4,\n", "same on every sample"),
        (jsonl_path, jsonl("measured", None), "same on every sample"),
        (csv_path, "t_s,power_w,kind\n0,2,guessed\n1,4,guessed\n", "one of measured, estimated"),
        (jsonl_path, jsonl("unavailable", "unavailable"), "one of measured, estimated"),
    ]:
        path.write_text(text)
        with pytest.raises(MeterUnavailable, match=needle) as err:
            ReplayMeter(path, kind="measured")  # a malformed trace is refused whatever the caller says
        assert str(path) in str(err.value)


def test_cpu_model_formula_and_psutil_consistency() -> None:
    clock, cpu = FakeClock(), [10.0]
    meter = CpuModelMeter("laptop", clock=clock, cpu_seconds=lambda: cpu[0])
    cpu[0] += 0.5
    clock.t += 2.0
    assert meter.joules() == pytest.approx(0.5 * 6.0 + 2.0 * 3.0)
    assert meter.kind == "estimated" and meter.source == "cpu-model"

    # The real meter in a process of its own: it counts the CPU time of every thread of its process,
    # and threads that earlier tests leave in pytest's process can burn enough of the sleep's wall
    # time to leave too little time without CPU time for the check to mean anything.
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import json, time
        import psutil
        from gelato.power import CpuModelMeter

        reads = []  # the meter's clock reads: the first is its start

        def clock():
            reads.append(time.monotonic())
            return reads[-1]

        real = CpuModelMeter("phone", clock=clock)
        proc = psutil.Process()
        before = sum(proc.cpu_times()[:2])
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        time.sleep(0.3)  # wall time without CPU time: a meter counting wall time as CPU time fails below
        used = sum(proc.cpu_times()[:2]) - before
        reading = real.read()  # its wall time from the meter's own clock: a stall before it changes both
        print(json.dumps({"used": used, "wall": reading.t_s - reads[0], "joules": reading.joules}))
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    used, wall = got["used"], got["wall"]
    assert used > 0.2 and wall > used + 0.25, got
    assert got["joules"] == pytest.approx(used * 2.0 + wall * 0.5, rel=0.1), got
    with pytest.raises(ValueError, match="unknown device profile"):
        CpuModelMeter("toaster")


def test_null_meter_propagates_nan() -> None:
    acct = EnergyAccountant(NullMeter(), radio_profile("wifi"))
    start = acct.round_start()
    tele = acct.round_end(start, DraftBlock(round=0, ids=(1, 2)), Verdict(0, 1, 5), 2, 100, 50)
    assert math.isnan(tele.e_compute_j) and math.isnan(tele.e_j)
    assert tele.e_radio_j > 0 and tele.energy_kind == "unavailable"


def test_radio_model_matches_reference_constants() -> None:
    lte = radio_profile("lte")
    assert lte is not None
    # 125 000 bytes = 1 Mbit up at 10 Mbit/s: 0.1 s at (438.39*10 + 1288.04) mW
    assert lte.round_energy_j(125_000, 0) == pytest.approx(0.1 * 5.67194)
    wifi = radio_profile("wifi")
    assert wifi is not None
    # 1 Mbit down at 50 Mbit/s: 0.02 s at (137.01*50 + 132.86) mW
    assert wifi.round_energy_j(0, 125_000) == pytest.approx(0.02 * 6.98336)
    assert radio_profile("none") is None
    with pytest.raises(ValueError, match="unknown radio"):
        radio_profile("carrier-pigeon")
