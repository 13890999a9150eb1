"""The emulated channel (`gelato.benchmarks.channel`, `gelato.benchmarks.channel_probe`): profiles, the refusal
without privileges (never a silent fallback), the lossy relay's exact byte stream, and — as root —
namespaces + veth + tbf set up, a measured round trip within ±20 % of the requested one, measured
rates, and teardown (normal, on SIGTERM, and of a killed run's leftovers)."""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gelato.benchmarks import bench
from gelato.benchmarks.channel import Channel, ChannelError, Listener, profile_from, reap_stale, run
from gelato.benchmarks.channel_probe import LossyProxy, build_parser
from gelato.benchmarks.delay_proxy import split_hostport


def _channel_unavailable() -> str:
    """Why this host cannot build the channel ("" when it can): root alone is not enough in a
    container without iproute2 or the capabilities (Docker's defaults lack CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        return "not root: creating network namespaces, veth pairs and tc qdiscs needs CAP_NET_ADMIN"
    if missing := [t for t in ("ip", "tc") if shutil.which(t) is None]:
        return f"no {' or '.join(missing)} (iproute2) on this host"
    probe = f"gelatoprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"root, but no network namespace can be made here (CAP_SYS_ADMIN?): {made.stderr.strip()}"
    gone = subprocess.run(["ip", "netns", "del", probe], capture_output=True, text=True, check=False)
    assert gone.returncode == 0, f"could not delete the probe namespace {probe}: {gone.stderr}"
    return ""


@pytest.fixture(scope="session")
def channel_host() -> None:
    """Skips where the channel cannot be built; asked once, and only when a channel test runs."""
    if why := _channel_unavailable():
        pytest.skip(why)


root = pytest.mark.usefixtures("channel_host")


def namespaces() -> list[str]:
    return run(["ip", "netns", "list"], check=False).stdout.split()


def test_profiles_and_overrides() -> None:
    lte = profile_from("lte")
    assert (lte.one_way_ms, lte.jitter_ms, lte.up_mbit, lte.loss) == (30.0, 10.0, 10.0, 0.0)
    assert profile_from("lossy").loss == 0.01 and profile_from("lossy").one_way_ms == 10.0
    p = profile_from("wifi", one_way_ms=5, loss=None)
    assert p.one_way_ms == 5 and p.jitter_ms == 2.0
    for bad in ({"loss": 1.0}, {"jitter_ms": -1}):
        with pytest.raises(ValueError):
            profile_from("wifi", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        profile_from("satellite")


def test_without_root_a_clear_error_never_a_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ChannelError, match="needs root"), Channel(profile_from("wifi")):
        pass
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    code = bench.main(["gsm8k", "--channel", "lte", "--limit", "1", "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "channel lte" in err and "needs root" in err and "--channel none" in err
    assert not (tmp_path / "o" / "summary.json").exists()  # nothing ran without the channel


STALL_MS = 1000.0  # a lost segment's stall: far above what the traffic itself takes (~0.2 s)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _through_lossy(n: int, loss: float = 0.2) -> tuple[bytes, bytes, dict[str, int], list[float]]:
    """`n` 4-byte items echoed through a `LossyProxy`: what came back, the segments counted, and
    each item's delay from its write to the read that completed its echo."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    proxy = LossyProxy(f"{host}:{port}", one_way_ms=1.0, jitter_ms=1.0, loss=loss, loss_stall_ms=STALL_MS, seed=2)
    async with proxy:
        reader, writer = await asyncio.open_connection(*split_hostport(proxy.address))
        sent = b"".join(i.to_bytes(4, "big") for i in range(n))
        written: list[float] = []
        echoed: list[tuple[int, float]] = []  # (bytes echoed so far, when)

        async def read_echo() -> bytes:
            got = b""
            while len(got) < len(sent) and (data := await reader.read(4096)):
                got += data
                echoed.append((len(got), time.perf_counter()))
            return got

        # Read while writing, so each item's echo is timed as it arrives, not when the writes are done.
        reading = asyncio.ensure_future(asyncio.wait_for(read_echo(), timeout=30))
        for i in range(n):
            written.append(time.perf_counter())
            writer.write(sent[4 * i : 4 * i + 4])
            if i % 5 == 0:
                await asyncio.sleep(0.0002)
        got = await reading
        writer.close()
        lost = proxy.lost_segments()
    server.close()
    await server.wait_closed()
    totals = [total for total, _ in echoed]
    delays = [
        echoed[k][1] - t if (k := bisect.bisect_left(totals, 4 * (i + 1))) < len(echoed) else math.inf
        for i, t in enumerate(written)
    ]
    return sent, got, lost, delays


def test_lossy_relay_keeps_the_byte_stream_exact() -> None:
    """Delay, jitter and loss stalls: every byte arrives, in order; losses are counted and cost time
    (a lost segment's bytes arrive `STALL_MS` late; without loss the same traffic's bytes come back
    within milliseconds)."""
    sent, got, lost, delays = asyncio.run(_through_lossy(600))
    assert got == sent
    assert lost["segments"] > 100 and 0.1 < lost["lost"] / lost["segments"] < 0.3
    _, clean_got, clean_lost, clean_delays = asyncio.run(_through_lossy(600, loss=0.0))
    assert clean_got == sent and clean_lost["lost"] == 0
    # Each item's own delay, not the runs' durations: load slows both runs unevenly, but nothing makes
    # bytes come back earlier than the relay let them, and a stall of the machine delays only the
    # items in flight during it. So: some echo at least a stall late, while most clean echoes are
    # far from one (a relay that stalls without loss fails there).
    assert max(delays) >= STALL_MS / 1e3, sorted(delays)[-5:]
    assert statistics.median(clean_delays) < 0.25 * STALL_MS / 1e3, statistics.median(clean_delays)


@root
def test_channel_setup_measured_delay_and_teardown() -> None:
    profile = profile_from("wifi", one_way_ms=15, jitter_ms=0, up_mbit=20, down_mbit=40)
    with Channel(profile) as ch:
        assert set(ch.ns.values()) <= set(namespaces())
        qdisc = run(["ip", "netns", "exec", ch.ns["device"], "tc", "qdisc", "show", "dev", ch.veth["device"]]).stdout
        assert "tbf" in qdisc and "20Mbit" in qdisc
        m = ch.measure()
        mech = ch.mechanisms
    rtt = m["measured"]["rtt_ms"]
    assert 30 * 0.8 <= rtt <= 30 * 1.2, m["measured"]
    assert 0.6 * 20 <= m["measured"]["up_mbit"] <= 1.1 * 20 and 0.6 * 40 <= m["measured"]["down_mbit"] <= 1.1 * 40
    assert mech["rate_up"].startswith("tc tbf") and ("relay" in mech["delay"] or "netem" in mech["delay"])
    assert ch.leftovers() == []
    links = run(["ip", "link", "show"]).stdout
    assert ch.veth["device"] not in links and ch.veth["edge"] not in links


@root
def test_sigterm_tears_the_channel_down() -> None:
    script = textwrap.dedent(
        """
        import time
        from gelato.benchmarks.channel import Channel, guard, profile_from
        with Channel(profile_from("lte")) as ch, guard(ch):
            print(" ".join(ch.ns.values()), flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    assert len(names) == 2 and set(names) <= set(namespaces())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not set(names) & set(namespaces())


@root
def test_namespaces_of_a_killed_run_are_reaped() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"gb{dead.pid}-dev"
    run(["ip", "netns", "add", name])
    # What a killed run leaves running inside (its edge, a relay): killed with the namespace, not
    # left running in it once the name is gone.
    left = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        for _ in range(100):  # until the sleep runs inside the namespace
            if run(["ip", "netns", "pids", name], check=False).stdout.split():
                break
            time.sleep(0.02)
        assert name in reap_stale()
        assert name not in namespaces()
        assert left.wait(timeout=10) == -9  # SIGKILL
    finally:
        left.kill()
        run(["ip", "netns", "del", name], check=False)


def test_measure_stops_its_probe_server_when_the_relay_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement's probe server (in the edge namespace, on the host here) is stopped when
    the relay in front of it fails to start, not left running: it is in no list `close` stops.
    That relay is pinned where the devices' relay is (it measures the same path)."""
    from gelato.benchmarks import channel as channel_module

    started: list[channel_module.Listener] = []

    class Recorded(channel_module.Listener):
        def __init__(self, cmd: list[str], timeout_s: float = 60.0) -> None:
            super().__init__(cmd, timeout_s)
            started.append(self)

    relay_cpus: list[int | None] = []

    def failing_relay(port: int, cpu: int | None = None) -> channel_module.Listener:
        relay_cpus.append(cpu)
        raise ChannelError("relay did not start")

    ch = Channel(profile_from("wifi"))  # never opened: its processes run on the host
    ch.relay_cpu = 1  # where `expose` pinned the devices' relay: the probe's relay runs there too
    monkeypatch.setattr(channel_module, "Listener", Recorded)
    monkeypatch.setattr(ch, "prefix", lambda side, cpu=None: [])
    monkeypatch.setattr(ch, "_relay", failing_relay)
    with pytest.raises(ChannelError, match="relay did not start"):
        ch.measure()
    assert len(started) == 1 and started[0].proc.poll() is not None
    assert relay_cpus == [1]


@root
def test_a_set_up_cut_short_by_sigterm_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (SystemExit under `guard`) right after the veth pair was made, before its ends
    moved into the namespaces: the pair, still in the root namespace, goes with the namespaces."""
    from gelato.benchmarks import channel as channel_module
    from gelato.benchmarks.channel import guard

    real_run = channel_module.run

    def cut(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if cmd[:3] == ["ip", "link", "set"] and "netns" in cmd:
            raise SystemExit(143)
        return real_run(cmd, check=check)

    ch = Channel(profile_from("wifi"))
    monkeypatch.setattr(channel_module, "run", cut)
    with pytest.raises(SystemExit), guard(ch), ch:
        pass
    monkeypatch.setattr(channel_module, "run", real_run)
    assert ch.leftovers() == []
    assert run(["ip", "link", "show", ch.veth["device"]], check=False).returncode != 0


def test_a_listener_interrupted_while_it_starts_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (SystemExit under `guard`) while a relay or probe starts: it is in no list `close`
    stops yet, so it stops itself rather than running on in the namespace."""
    import threading

    from gelato.benchmarks import channel as channel_module

    started: list[subprocess.Popen[str]] = []
    real_popen = subprocess.Popen

    def recording(*args: object, **kwargs: object) -> subprocess.Popen[str]:
        proc = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    def interrupted(self: threading.Event, timeout: float | None = None) -> bool:
        raise SystemExit(143)

    monkeypatch.setattr(subprocess, "Popen", recording)
    monkeypatch.setattr(threading.Event, "wait", interrupted)
    with pytest.raises(SystemExit):
        channel_module.Listener(["sleep", "60"])
    monkeypatch.undo()
    assert len(started) == 1 and started[0].poll() is not None


@pytest.mark.parametrize("netem", [True, False])
def test_the_relay_adds_the_profiles_delay_only_without_netem(monkeypatch: pytest.MonkeyPatch, netem: bool) -> None:
    """With netem on the veth ends, the relay in front of the edge must add no delay, jitter or
    loss of its own (it passed none, and the relay's default is 10 ms each way: a wifi run had a
    ~40 ms round trip credited to netem's 20); without netem it adds the profile's."""
    seen: list[list[str]] = []

    class Recorded:
        def __init__(self, cmd: list[str], timeout_s: float = 60.0) -> None:
            seen.append(cmd)
            self.address = "10.0.0.1:1"

    monkeypatch.setattr("gelato.benchmarks.channel.Listener", Recorded)
    ch = Channel(profile_from("lossy"))
    ch.netem = netem
    ch.expose(50051)
    args = build_parser().parse_args(seen[0][seen[0].index("proxy") :])
    relayed = (args.one_way_ms, args.jitter_ms, args.loss)
    assert relayed == ((0.0, 0.0, 0.0) if netem else (10.0, 2.0, 0.01)), relayed


@root
def test_the_loss_the_runs_met_is_counted_by_the_devices_relay() -> None:
    """The devices' relay's own counts (both directions, its whole life) come back when it stops: a
    run's realised loss, beside the profile's probability (a 20 % loss profile, ~1 MiB each way)."""
    profile = profile_from("lossy", one_way_ms=1, jitter_ms=0, up_mbit=0, down_mbit=0, loss=0.2, loss_stall_ms=5)
    with Channel(profile) as ch:
        server = Listener([*ch.prefix("edge"), sys.executable, "-m", "gelato.benchmarks.channel_probe", "server"])
        try:
            address = ch.expose(server.port)
            args = ["--address", address, "--n", "10", "--bytes-up", str(1 << 20), "--bytes-down", str(1 << 20)]
            ch._probe("device", args)
            loss = ch.realised_loss()
            assert ch.procs[0].proc.poll() is not None  # the relay was stopped to read its counts
        finally:
            server.stop()
    assert loss is not None and loss["segments"] > 1000, loss
    assert 0.15 < loss["rate"] < 0.25 and loss["rate"] == loss["lost"] / loss["segments"], loss
    assert Channel(profile_from("none")).realised_loss() is None  # no relay: nothing was counted
