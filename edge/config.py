"""The edge's settings, `EdgeConfig`: one typed field per `gelato-edge` option.

Contract: each field's default, bounds and help are written here once; `gelato-edge`'s flags, its
`--help` and its `GELATO_EDGE_*` variables are made from them (`gelato.config`), and
`EdgeServer(config)` takes the same object. `validate()` raises `gelato.config.ConfigError` naming
the flag (`--max-sessions must be >= 1`). Imports no torch and no gRPC: the health check stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gelato.channel import MAX_DRAFT_TOKENS
from gelato.cli_common import log_format, log_level, max_memory, model_device, model_dtype, port_number, torch_threads
from gelato.config import (
    FILE_PATH,
    MAX_TIMEOUT_S,
    MODEL_PATH,
    PORT,
    UINT32,
    Check,
    Settings,
    ge,
    gt,
    le,
    require,
    setting,
)

_OPEN_TIMEOUT_S = 30.0
DEVICE_MAPS = ("auto", "balanced", "sequential")  # gelato.models.DEVICE_MAPS, without importing torch
DRAFTS_FIT = Check(
    lambda k: k <= MAX_DRAFT_TOKENS,
    f"must be <= {MAX_DRAFT_TOKENS} (a sampling block of more drafts may not fit a gRPC message)",
)
# --metrics-port and --health-port: unlike --port (whose real number is printed), 0 would bind a
# random port that no line names and no scraper or probe could find.
NAMED_PORT = Check(lambda p: p >= 1, "must be >= 1 (0 would pick a port nobody is told)")


@dataclass(frozen=True)
class EdgeConfig(Settings):
    """Everything `gelato-edge` can be told (`gelato-edge --help`)."""

    target: str | None = setting(None, "hub id or local folder (default: the embedded tiny target)", check=MODEL_PATH)
    host: str = setting(
        "127.0.0.1", "bind address (a non-loopback one needs TLS with a token or --tls-client-ca, or --insecure)"
    )
    port: int = setting(50051, "gRPC port; 0 picks a free one", type=port_number, check=PORT)
    max_sessions: int = setting(64, "open sessions at most (beyond: RESOURCE_EXHAUSTED)", check=(ge(1), UINT32))
    max_sessions_per_client: int = setting(
        0,
        "Session streams (open, or waiting for their open) one client may hold (beyond: RESOURCE_EXHAUSTED), a "
        "client being its certificate under --tls-client-ca, else its IP address (an IPv6 one by its /64); 0: no "
        "limit",
        check=(ge(0), UINT32),
    )
    max_draft_tokens: int = setting(32, "largest draft block accepted", check=(ge(1), DRAFTS_FIT))
    max_ahead_rounds: int = setting(
        4,
        "send-ahead (pipelined speculation): blocks a device may keep in flight past the one whose verdict it "
        "awaits (told in SessionOpened; the edge, answering in order, can only refuse a block this many rounds "
        "or more past the session's verified round, OUT_OF_RANGE); 0: off",
        check=(ge(0), UINT32),
    )
    kv_budget_mb: float = setting(
        0.0, "target KV memory for sessions, in MiB (0: no limit)", check=(ge(0), le(2**40))
    )  # 1 EiB: its bytes travel as a uint64 (InfoResponse)
    batch_window_ms: float = setting(
        2.0,
        "wait this long for more rows to batch (at most 10000: every waiting row waits it)",
        check=(ge(0), le(10_000)),
    )
    max_batch: int = setting(16, "most draft blocks verified in one forward", check=ge(1))
    prefill_chunk_tokens: int = setting(
        1024,
        "prefill a prompt in forwards of at most this many tokens, other sessions' verification running "
        "in between (the attention mask of one piece is this x the context, not prompt x prompt); 0: at once",
        check=ge(0),
    )
    idle_timeout_s: float = setting(
        300.0, "end a session whose device sends nothing, or takes no answer, this long", check=gt(0)
    )
    open_timeout_s: float = setting(
        _OPEN_TIMEOUT_S,
        "end a Session stream that sends no open this long after it starts (at most --idle-timeout-s)",
        check=(gt(0), le(MAX_TIMEOUT_S)),
    )
    metrics_port: int | None = setting(
        None, "serve Prometheus metrics on this port (default: none)", type=port_number, check=(PORT, NAMED_PORT)
    )
    metrics_host: str = setting(
        "127.0.0.1", "bind address of --metrics-port, whatever --host is (metrics are plaintext, no token)"
    )
    log_level: str = log_level()
    log_format: str = log_format()
    # Security (gelato.security): TLS when a certificate and key are given (mutual TLS with a client
    # CA); every call but health needs `Bearer <token>` when a token file is given.
    tls_cert: str | None = setting(None, "PEM server certificate (chain): serve TLS", check=FILE_PATH)
    tls_key: str | None = setting(None, "PEM private key of --tls-cert", check=FILE_PATH)
    tls_client_ca: str | None = setting(
        None, "PEM CA: require client certificates it signed (mutual TLS)", check=FILE_PATH
    )
    auth_token_file: str | None = setting(None, "file holding the bearer token every call must carry", check=FILE_PATH)
    insecure: bool = setting(
        False,
        "serve a non-loopback --host without TLS and a token or client certificates (anyone who reaches the "
        "port can use it), or with a token in plaintext",
    )
    shutdown_grace_s: float = setting(
        5.0,
        "on SIGTERM/SIGINT, let open sessions finish this long before cutting them",
        check=(ge(0), le(MAX_TIMEOUT_S)),  # 1e308 was taken: a drain only SIGKILL could end
    )
    health_port: int | None = setting(
        None,
        "also serve the gRPC health service alone, in plaintext, on this port (for probes without TLS)",
        type=port_number,
        check=(PORT, NAMED_PORT),
    )
    health_host: str = setting("127.0.0.1", "bind address of --health-port")
    health_check_timeout_s: float = setting(3.0, "deadline of --health-check", check=(gt(0), le(MAX_TIMEOUT_S)))
    device_map: str | None = setting(
        None,
        "place the target over the GPUs, CPU memory and disk with accelerate (a target too large for one "
        "device); replaces --device",
        choices=DEVICE_MAPS,
    )
    max_memory: dict[int | str, int] | None = setting(  # noqa: RUF009 (a field, see gelato.config)
        None,
        "with --device-map: the most each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
        type=max_memory,
        metavar="DEV=SIZE,...",
    )
    offload_folder: str | None = setting(
        None,
        "with --device-map: where weights beyond memory go",
        check=Check(lambda x: bool(x.strip()), "must name a folder"),
    )
    dtype: str = model_dtype()
    device: str = model_device()
    threads: int | None = torch_threads()
    # Not an option: the token read from --auth-token-file at start (kept out of repr and logs).
    auth_token: str | None = field(default=None, repr=False)

    def check(self) -> None:
        require(bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together")
        # A stream waiting for its open is idle too: the shorter limit ends it. Given longer, the
        # open timeout would be silently cut (its default is, under a short --idle-timeout-s).
        require(
            self.open_timeout_s <= self.idle_timeout_s or self.open_timeout_s == _OPEN_TIMEOUT_S,
            f"--open-timeout-s {self.open_timeout_s:g} would be cut to --idle-timeout-s {self.idle_timeout_s:g}: "
            "a stream waiting for its open is idle (give an --idle-timeout-s at least as long)",
        )
        require(
            not self.tls_client_ca or bool(self.tls_cert),
            "--tls-client-ca needs --tls-cert/--tls-key (mutual TLS is TLS first)",
        )
        require(
            bool(self.device_map or not (self.max_memory or self.offload_folder)),
            "--max-memory and --offload-folder need --device-map",
        )
        require(
            not self.device_map or self.device == "auto",
            f"--device {self.device} and --device-map exclude each other: the map places the model",
        )
        # The edge's own listeners on one port of one address: the second bind failed as "port P
        # is in use", blaming another process and naming the wrong flag (0 picks a free port).
        ports = [(f, h, p) for f, h, p in (("--port", self.host, self.port),
                                           ("--metrics-port", self.metrics_host, self.metrics_port),
                                           ("--health-port", self.health_host, self.health_port)) if p]  # fmt: skip
        for i, (flag, host, port) in enumerate(ports):
            for other, other_host, same in ports[i + 1 :]:
                require(
                    port != same or not _binds_overlap(host, other_host),
                    f"{flag} and {other} are both {port}: each listener needs its own port",
                )


def _addresses(host: str) -> set[str]:
    """The addresses a bind to `host` takes ("localhost": both loopbacks; "" or "::": every one)."""
    host = host.strip("[]")
    return {"127.0.0.1", "::1"} if host == "localhost" else {"::" if host == "" else host}


def _binds_overlap(a: str, b: str) -> bool:
    """Whether binds of one port to hosts `a` and `b` collide: a shared address, `::` (dual stack:
    every address), or 0.0.0.0 against an IPv4 one."""
    first, second = _addresses(a), _addresses(b)
    if first & second or "::" in first | second:
        return True
    return any("0.0.0.0" in x and any(":" not in h for h in y) for x, y in ((first, second), (second, first)))
