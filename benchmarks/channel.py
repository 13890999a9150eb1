"""An emulated wireless channel between two hosts on one machine.

Contract. `Channel(profile, seed)` is a context manager. For a profile other than `none` it
creates two network namespaces (`gb<pid>-dev`, `gb<pid>-edge`) joined by a veth pair
(10.213.0.1 device side, 10.213.0.2 edge side: addresses that exist only inside those two
namespaces), puts `tc tbf` on each veth end for the rates (device end: up, edge end: down), and
produces delay, jitter and loss with `tc netem` where the kernel has it, else with
`gelato.benchmarks.channel_probe`'s userspace relay (order-preserving per direction; loss as the
retransmission stall TCP would show), run inside the edge namespace between the veth and the
edge's loopback port. `mechanisms` records which mechanism produced each impairment.

    with Channel(profile_from(args)) as ch:
        edge = start_edge([...], prefix=ch.prefix("edge", cpu))      # the edge binds its loopback
        address = ch.expose(edge_port)                                 # what devices dial
        device processes: ch.prefix("device", cpu) + [python, -m, gelato.device.cli, --edge, address, ...]
        ch.measure(address, edge_port)                                 # RTT and rates, measured

`none` runs everything on the host's loopback, with no impairment (every mechanism "none").
Teardown (`close`, idempotent) stops the processes it started and deletes both namespaces, which
removes the veth and its qdiscs; `guard(channel)` also runs it on SIGTERM/SIGHUP and at exit
(Ctrl-C raises KeyboardInterrupt, so `with` blocks run). Namespaces left by a killed run (their
pid is gone) are deleted at the next set-up, the processes still running in them killed
first. Without the privileges to create namespaces,
`ChannelError` says so: there is never a silent fallback to no channel.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from gelato.benchmarks.channel_probe import DEFAULT_STALL_MS
from gelato.benchmarks.procs import child_env, exit_on_signals, stop_process

DEVICE_IP, EDGE_IP = "10.213.0.1", "10.213.0.2"
NETNS_RE = re.compile(r"^gb(\d+)-(dev|edge)$")


class ChannelError(RuntimeError):
    """The channel cannot be built (privileges, missing tools): never fall back silently."""


@dataclass(frozen=True)
class Profile:
    """One-way delay and ± uniform jitter per direction, link rates (0: unlimited), loss per
    segment and the stall a loss costs."""

    name: str
    one_way_ms: float = 0.0
    jitter_ms: float = 0.0
    up_mbit: float = 0.0
    down_mbit: float = 0.0
    loss: float = 0.0
    loss_stall_ms: float = DEFAULT_STALL_MS

    @property
    def impaired(self) -> bool:
        return self.name != "none"


PROFILES = {
    "none": Profile("none"),
    "wifi": Profile("wifi", one_way_ms=10.0, jitter_ms=2.0, up_mbit=50.0, down_mbit=50.0),
    "lte": Profile("lte", one_way_ms=30.0, jitter_ms=10.0, up_mbit=10.0, down_mbit=30.0),
    "lossy": Profile("lossy", one_way_ms=10.0, jitter_ms=2.0, up_mbit=50.0, down_mbit=50.0, loss=0.01),
}


def profile_from(name: str, **overrides: float | None) -> Profile:
    """A named profile with any parameter replaced (None: keep the profile's)."""
    if name not in PROFILES:
        raise ValueError(f"unknown channel {name!r}; known: {', '.join(PROFILES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    bad = [k for k, v in given.items() if v < 0 or (k == "loss" and v >= 1)]
    if bad:
        raise ValueError(f"channel parameters out of range: {', '.join(bad)}")
    if given and name == "none":
        raise ValueError("--channel none takes no impairment parameters")
    return replace(PROFILES[name], **given)  # type: ignore[arg-type]  # only float fields are overridden


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise ChannelError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


class Listener:
    """A background process that prints `listening on HOST:PORT`; its output is drained for its
    whole life (a full pipe would block it)."""

    def __init__(self, cmd: list[str], timeout_s: float = 60.0) -> None:
        self.cmd = cmd
        self.address = ""
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        try:
            self._drainer.start()
            ready = self._ready.wait(timeout_s) and bool(self.address)
        except BaseException:  # SIGTERM (SystemExit under `guard`) while it starts: in no list yet
            self.stop()
            raise
        if not ready:
            self.stop()
            raise ChannelError(f"{' '.join(cmd[-8:])} did not start:\n" + "".join(self.lines[-30:]))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = None if self.address else re.search(r"listening on ([\w.\-\[\]:]+:\d+)", line)
            if m:
                self.address = m.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self) -> int:
        return stop_process(self.proc, 10)

    def last_words(self, timeout_s: float = 5.0) -> list[str]:
        """Stops the process and returns all it printed, its exit lines included (the drain thread
        may still be reading them when the process has gone)."""
        self.stop()
        self._drainer.join(timeout_s)
        return list(self.lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Delete namespaces named by this module whose creating process is gone (a killed run), after
    killing what still runs in them (its edge, relays, devices): deleting the name alone would
    leave those running, and the namespace with its veth and qdiscs alive under them, unnamed."""
    res = run(["ip", "netns", "list"], check=False)
    gone = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NETNS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", name], check=False)
            gone.append(name)
    return gone


def check_privileges() -> None:
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise ChannelError(f"the emulated channel needs {' and '.join(missing)} (iproute2); use --channel none")
    if os.geteuid() != 0:
        raise ChannelError(
            "the emulated channel creates network namespaces, a veth pair and tc qdiscs, which needs root "
            "(CAP_NET_ADMIN and CAP_SYS_ADMIN); run as root, or use --channel none for loopback without impairment"
        )


class Channel:
    def __init__(self, profile: Profile, seed: int = 0, delay: str = "auto") -> None:
        if delay not in ("auto", "proxy", "netem"):
            raise ValueError("delay mechanism must be auto, proxy or netem")
        self.profile, self.seed, self.delay_choice = profile, seed, delay
        tag = f"gb{os.getpid()}"
        self.ns = {"device": f"{tag}-dev", "edge": f"{tag}-edge"}
        self.veth = {"device": f"{tag}d"[-15:], "edge": f"{tag}e"[-15:]}
        self.procs: list[Listener] = []
        self.relay_cpu: int | None = None  # the CPU the devices' relay is pinned to (`expose`)
        self.netem = False
        self.created: list[str] = []
        self._closed = False

    # ---------------------------------------------------------------- set-up

    def __enter__(self) -> Channel:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if not self.profile.impaired:
            return
        check_privileges()
        reap_stale()
        for side in ("device", "edge"):
            run(["ip", "netns", "add", self.ns[side]])
            self.created.append(self.ns[side])
        dev, edge = self.veth["device"], self.veth["edge"]
        run(["ip", "link", "add", dev, "type", "veth", "peer", "name", edge])
        for side, ip in (("device", DEVICE_IP), ("edge", EDGE_IP)):
            try:
                run(["ip", "link", "set", self.veth[side], "netns", self.ns[side]])
            except ChannelError:
                run(["ip", "link", "del", dev], check=False)  # still in the root namespace
                raise
            self.ip(side, "addr", "add", f"{ip}/30", "dev", self.veth[side])
            self.ip(side, "link", "set", self.veth[side], "up")
            self.ip(side, "link", "set", "lo", "up")
        self.netem = self.delay_choice == "netem" or (self.delay_choice == "auto" and self._netem_available())
        if self.delay_choice == "netem" and not self._netem_available():
            raise ChannelError("--delay-mechanism netem: this kernel has no netem qdisc")
        rates = {"device": self.profile.up_mbit, "edge": self.profile.down_mbit}  # each end's egress
        for side, mbit in rates.items():
            self._qdiscs(side, mbit)

    def ip(self, side: str, *args: str) -> None:
        run(["ip", "-n", self.ns[side], *args])

    def tc(self, side: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns[side], "tc", *args], check=check)

    def _netem_available(self) -> bool:
        dev = self.veth["device"]
        ok = self.tc("device", "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms", check=False).returncode == 0
        if ok:
            self.tc("device", "qdisc", "del", "dev", dev, "root", check=False)
        return ok

    def _qdiscs(self, side: str, mbit: float) -> None:
        dev, p = self.veth[side], self.profile
        tbf_parent = ["root"]
        if self.netem:
            netem = ["delay", f"{p.one_way_ms}ms", f"{p.jitter_ms}ms", "loss", f"{p.loss * 100}%"]
            self.tc(side, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", *netem)
            tbf_parent = ["parent", "1:1"]
        if mbit > 0:
            burst = max(int(mbit * 1e6 / 8 * 1e-3), 3028)  # 1 ms of line rate, at least two frames
            tbf = ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms"]
            self.tc(side, "qdisc", "add", "dev", dev, *tbf_parent, "handle", "2:", *tbf)

    # ---------------------------------------------------------------- processes in the namespaces

    def prefix(self, side: str, cpu: int | None = None) -> list[str]:
        """Launcher for a process on `side` (device or edge), pinned to `cpu` when given."""
        pin = ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []
        ns = ["ip", "netns", "exec", self.ns[side]] if self.profile.impaired else []
        return [*ns, *pin]

    def expose(self, port: int, cpu: int | None = None) -> str:
        """The address devices dial to reach a loopback `port` in the edge namespace, through the
        channel: the relay in the edge namespace (or, with netem, a plain relay with no delay)."""
        if not self.profile.impaired:
            return f"127.0.0.1:{port}"
        self.relay_cpu = cpu  # `measure`'s relay runs where this one does
        self.procs.append(self._relay(port, cpu))
        return self.procs[-1].address

    def _relay(self, port: int, cpu: int | None = None) -> Listener:
        p = self.profile
        # Always said: with netem the relay must add nothing (its own defaults are a 10 ms relay).
        relayed = (0.0, 0.0, 0.0) if self.netem else (p.one_way_ms, p.jitter_ms, p.loss)
        delay = ["--one-way-ms", f"{relayed[0]:g}", "--jitter-ms", f"{relayed[1]:g}", "--loss", f"{relayed[2]:g}"]
        delay += [] if self.netem else ["--loss-stall-ms", f"{p.loss_stall_ms:g}"]
        cmd = [*self.prefix("edge", cpu), sys.executable, "-m", "gelato.benchmarks.channel_probe", "proxy"]
        cmd += ["--listen", f"{EDGE_IP}:0", "--upstream", f"127.0.0.1:{port}", "--seed", str(self.seed), *delay]
        return Listener(cmd)

    def realised_loss(self) -> dict[str, Any] | None:
        """Stops the devices' relay (`expose`) and returns the segments it carried and lost in both
        directions over its life (every run through it, and `measure`'s gRPC calls through it): what
        the runs met, next to the profile's probability. None with no relay, or with netem doing
        the loss (not counted here)."""
        if not self.procs or self.netem or not self.profile.loss:
            return None
        for line in reversed(self.procs[0].last_words()):
            if line.startswith("channel proxy: {"):
                counts = json.loads(line.removeprefix("channel proxy: "))
                segments, lost = int(counts["segments"]), int(counts["lost"])
                return {"segments": segments, "lost": lost, "rate": lost / segments if segments else None}
        raise ChannelError("the channel relay exited without its loss counts:\n" + "".join(self.procs[0].lines[-20:]))

    @property
    def mechanisms(self) -> dict[str, str]:
        p = self.profile
        if not p.impaired:
            return dict.fromkeys(("delay", "jitter", "rate_up", "rate_down", "loss"), "none (loopback)")
        relay = "userspace relay in the edge namespace (gelato.benchmarks.channel_probe, order-preserving)"
        lat = "tc netem on both veth ends" if self.netem else relay
        loss = (
            "tc netem loss on both veth ends"
            if self.netem
            else f"{relay}: retransmission stall of {p.loss_stall_ms:g} ms per chunk with a lost segment"
        )
        tbf = "tc tbf on the {} veth end"
        return {
            "delay": lat,
            "jitter": lat if p.jitter_ms else "none",
            "rate_up": tbf.format("device") if p.up_mbit else "unlimited (veth)",
            "rate_down": tbf.format("edge") if p.down_mbit else "unlimited (veth)",
            "loss": loss if p.loss else "none",
            "namespaces": f"{self.ns['device']} ({DEVICE_IP}) <-veth-> {self.ns['edge']} ({EDGE_IP})",
        }

    def describe(self) -> dict[str, Any]:
        return {"profile": asdict(self.profile), "mechanisms": self.mechanisms}

    # ---------------------------------------------------------------- measurement

    def _probe(self, side: str, args: list[str]) -> dict[str, Any]:
        cmd = [*self.prefix(side), sys.executable, "-m", "gelato.benchmarks.channel_probe", "client", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=child_env())
        if res.returncode != 0:
            raise ChannelError(f"channel probe failed: {res.stderr.strip()[-2000:]}")
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))

    def measure(self, edge_address: str | None = None, edge_port: int | None = None) -> dict[str, Any]:
        """Round trip (64-byte echoes, ping-like) and up/down rate through the same path as the
        devices (a probe endpoint behind an identical relay, pinned as the devices' relay is; the
        edge idle meanwhile, so a relay slowed by a busy edge core shows only in the runs); with an
        edge, also timed gRPC Info calls through the path minus the same calls on the edge's own
        loopback: the round trip gRPC sees added."""
        p = self.profile
        server = Listener([*self.prefix("edge"), sys.executable, "-m", "gelato.benchmarks.channel_probe", "server"])
        relay: Listener | None = None
        grpc_via = ["--grpc", edge_address] if edge_address else []
        grpc_direct = ["--grpc", f"127.0.0.1:{edge_port}"] if edge_port else []
        try:  # from here on the server is stopped however this ends (a relay that fails to start too)
            relay = self._relay(server.port, self.relay_cpu) if p.impaired else None
            path = relay.address if relay else server.address
            sizes = ["--bytes-up", str(_bulk_bytes(p.up_mbit)), "--bytes-down", str(_bulk_bytes(p.down_mbit))]
            via = self._probe("device" if p.impaired else "edge", ["--address", path, *grpc_via, *sizes])
            direct = self._probe("edge", ["--address", server.address, *grpc_direct])
        finally:
            for proc in (relay, server):
                if proc is not None:
                    proc.stop()
        measured = {
            "rtt_ms": via["echo"]["median_ms"],
            "rtt_p10_p90_ms": [via["echo"]["p10_ms"], via["echo"]["p90_ms"]],
            "up_mbit": via["up"]["measured_mbps"],
            "down_mbit": via["down"]["measured_mbps"],
        }
        if edge_address and edge_port:
            measured["grpc_added_rtt_ms"] = round(via["grpc_info"]["median_ms"] - direct["grpc_info"]["median_ms"], 3)
        return {
            "nominal": {"rtt_ms": 2 * p.one_way_ms, "up_mbit": p.up_mbit or None, "down_mbit": p.down_mbit or None},
            "measured": measured,
            "via_path": via,
            "direct": direct,
        }

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        for ns in reversed(self.created):  # deleting a namespace removes its veth end and qdiscs
            run(["ip", "netns", "del", ns], check=False)
        if self.created:  # a veth pair not yet moved into the namespaces (a set-up cut short)
            run(["ip", "link", "del", self.veth["device"]], check=False)

    def leftovers(self) -> list[str]:
        """Namespaces of this channel that still exist (for tests and the run record)."""
        names = run(["ip", "netns", "list"], check=False).stdout.split()
        return [n for n in self.ns.values() if n in names]


def _bulk_bytes(mbit: float) -> int:
    """Half a second of line rate, 256 KiB to 8 MiB (4 MiB when unlimited)."""
    return 4 << 20 if not mbit else min(max(int(mbit * 1e6 / 8 * 0.5), 256 << 10), 8 << 20)


@contextlib.contextmanager
def guard(channel: Channel) -> Iterator[Channel]:
    """Tear the channel down however the run ends: normal exit, exception, Ctrl-C (KeyboardInterrupt
    runs this `finally`), SIGTERM/SIGHUP (SystemExit, `procs.exit_on_signals`) or interpreter exit."""
    atexit.register(channel.close)
    try:
        with exit_on_signals():
            yield channel
    finally:
        channel.close()
        atexit.unregister(channel.close)
