"""The radio model's link rates follow the link actually used: `radio_profile(name, up, down)`,
`gelato-device --radio-up-mbit/--radio-down-mbit`, and `gelato-bench gsm8k`, which passes its
channel's `--up-mbit/--down-mbit` to the devices and uses them in the oracle's cost fit (once the
radio model kept its own 10 Mbit/s on a channel emulating 5)."""

from __future__ import annotations

import math

import pytest

from gelato.benchmarks import bench
from gelato.benchmarks.channel import profile_from
from gelato.config import ConfigError
from gelato.device.cli import build_parser as device_parser
from gelato.device.cli import open_accountant
from gelato.device.config import DeviceConfig
from gelato.power import radio_profile


def test_rates_replace_the_profiles_own_in_time_and_power() -> None:
    own, slow = radio_profile("lte"), radio_profile("lte", 5.0, 0.0)
    assert own is not None and slow is not None
    assert (slow.up_mbps, slow.down_mbps) == (5.0, own.down_mbps)
    # 1 Mbit up at 5 Mbit/s: 0.2 s at (438.39 * 5 + 1288.04) mW (Huang et al.'s linear model).
    assert slow.round_energy_j(125_000, 0) == pytest.approx(0.2 * (438.39 * 5 + 1288.04) / 1e3)
    assert slow.round_energy_j(0, 125_000) == own.round_energy_j(0, 125_000)
    assert own.label == "lte" and slow.label == "lte 5/30 Mbit/s"
    assert radio_profile("wifi", 50.0, 50.0).label == "wifi"  # type: ignore[union-attr]  # its own rates
    assert radio_profile("none", 5.0, 5.0) is None
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite number >= 0"):
            radio_profile("wifi", bad, 0.0)


def _config(*args: str) -> DeviceConfig:
    config = DeviceConfig.from_args(device_parser().parse_args(["--prompt", "x", "--meter", "none", *args]))
    config.validate()
    return config


def test_device_flags_reach_the_accountant() -> None:
    radio = open_accountant(_config("--radio", "lte", "--radio-up-mbit", "5", "--radio-down-mbit", "20")).radio
    assert radio is not None and (radio.up_mbps, radio.down_mbps) == (5.0, 20.0)
    radio = open_accountant(_config("--radio", "lte")).radio
    assert radio is not None and (radio.up_mbps, radio.down_mbps) == (10.0, 30.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--radio", "none", "--radio-up-mbit", "5"], "--radio none models no radio"),
        (["--radio-down-mbit", "-1"], "--radio-down-mbit must be >= 0"),
        (["--radio-up-mbit", "inf"], "--radio-up-mbit must be >= 0"),
    ],
)
def test_device_refuses_rates_it_cannot_use(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(*args)


def test_bench_passes_its_channel_rates_to_the_devices() -> None:
    lte = profile_from("lte", up_mbit=5.0)
    assert bench.radio_rates(lte, "lte") == (5.0, 30.0)
    assert bench.radio_rates(lte, "none") == (0.0, 0.0)
    assert bench.radio_rates(profile_from("none"), "wifi") == (0.0, 0.0)  # loopback: the model's own
    args = bench.build_parser().parse_args(["gsm8k", "--channel", "lte", "--up-mbit", "5"])
    args.radio, args.radio_rates_mbit = "lte", bench.radio_rates(lte, "lte")
    one = object.__new__(bench.Bench)
    one.args = args
    words = one.device_base("127.0.0.1:1")
    assert words[words.index("--radio-up-mbit") + 1] == "5" and words[words.index("--radio-down-mbit") + 1] == "30"
    args.radio_rates_mbit = (0.0, 0.0)
    assert "--radio-up-mbit" not in one.device_base("127.0.0.1:1")
    note = bench.energy_note("phone", "lte", (5.0, 30.0))
    assert "`lte` radio model at the channel's 5/30 Mbit/s" in note
    assert "Mbit/s" not in bench.energy_note("phone", "lte")


def test_the_oracles_cost_fit_uses_the_rates_the_devices_had() -> None:
    """The fit takes the transfers' time out of the measured t_net: at the radio's 10 Mbit/s a
    2 kB block takes 1.6 ms up, at the channel's 1 Mbit/s 16 ms, and the rest is the round trip."""
    from gelato.benchmarks import bench_refs
    from gelato.benchmarks.bench_run import RunResult, RunSpec

    run = RunResult(RunSpec("fixed-4", "fixed-4", "fixed"))
    for k in (2, 4, 6):
        run.rounds.append(
            {
                "k": k,
                "t_draft_s": 0.001 * k,
                "t_net_s": 0.05,
                "t_edge_compute_s": 0.002,
                "t_edge_queue_s": 0.0,
                "t_round_s": 0.06,
                "bytes_up": 500 * k,
                "bytes_down": 0,
                "e_compute_j": 0.01,
            }
        )
    _, own = bench_refs.fit_model([run], "lte", 64, 8)
    _, slow = bench_refs.fit_model([run], "lte", 64, 8, (1.0, 30.0))
    assert own["t_net_s"] == pytest.approx(0.05 - 2000 * 8 / 10e6)
    assert slow["t_net_s"] == pytest.approx(0.05 - 2000 * 8 / 1e6)
