"""The device's settings, `DeviceConfig`: one typed field per `gelato-device` option.

Contract: each field's default, bounds and help are written here once; `gelato-device`'s flags,
its `--help` and its `GELATO_DEVICE_*` variables are made from them (`gelato.config`). The
controller's constants are the nested `controller: PolicyOptions` (`gelato.device.policy_options`), whose own
fields are their single source: the simulator and benchmarks build `PolicyOptions` directly with
the same defaults. `validate()` raises `gelato.config.ConfigError` (a ValueError) naming the flag
(`--max-new-tokens must be >= 1`), or the policy's or the sampling parameters' own message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gelato.cli_common import endpoint, log_format, log_level, model_device, model_dtype, torch_threads
from gelato.config import (
    FILE_PATH,
    HOST_NAME,
    MAX_TIMEOUT_S,
    MODEL_PATH,
    UINT32,
    Check,
    ConfigError,
    Settings,
    ge,
    gt,
    le,
    nested,
    require,
    setting,
)
from gelato.device.policy import parse_policy
from gelato.device.policy_options import PolicyOptions
from gelato.power import PROFILES, RADIOS
from gelato.types import MAX_FLOAT32, SamplingParams, as_float32
from gelato.wire import MAX_Q_SUPPORT

DEFAULT_TOP_M = 32  # draft support sent per token when sampling (the drafter's default too)
POLICY_HELP = (
    "draft-length policy: fixed-K (e.g. fixed-4; fixed-0: the edge decodes alone), heuristic, entropy, "
    "adaedl, lyapunov, gelato, ar-edge (the edge alone, streamed), ar-device (the drafter alone, no edge)"
)
DEFAULT_POLICY = "fixed-4"  # without --policy and without a budget
DEFAULT_PROFILE = "phone"  # the cpu-model estimate's device class unless told


def _wire_float(x: float) -> float:
    """`x` as float32, where it fits (beyond, validation refuses it, naming the value given)."""
    return as_float32(x) if abs(x) <= MAX_FLOAT32 else x


@dataclass(frozen=True)
class DeviceConfig(Settings):
    """Everything `gelato-device` can be told (`gelato-device --help`)."""

    drafter: str | None = setting(None, "hub id or local folder (default: the embedded tiny drafter)", check=MODEL_PATH)
    edge: str = setting(
        "127.0.0.1:50051",
        "HOST:PORT of gelato-edge, or a gRPC target naming replicas (dns:///edge:50051, ipv4:A:P,B:P)",
        type=endpoint,
    )
    failovers: int = setting(
        2,
        "attempts per generation to open a session again when its edge is unavailable (gone mid-generation, "
        "or an open refused UNAVAILABLE) or, on a re-open, full (RESOURCE_EXHAUSTED)",
        check=ge(0),
    )
    prompt: list[str] | None = setting(None, "a prompt (repeatable)", action="append", one_of="prompts", required=True)  # noqa: RUF009 (a field, see gelato.config)
    prompts_file: Path | None = setting(  # noqa: RUF009 (a field, see gelato.config)
        None, "JSONL with 'prompt' or 'question' per line", one_of="prompts", required=True
    )
    limit: int | None = setting(
        None, "use only the first N prompts of the file", check=(ge(0), Check(bool, "must be >= 1 (0 runs no prompt)"))
    )
    max_new_tokens: int = setting(256, "tokens to generate per prompt, at most", check=(ge(1), UINT32))
    policy: str = setting("auto", POLICY_HELP + "; auto: gelato with --energy-budget-j-per-token, else fixed-4")
    controller: PolicyOptions = nested(PolicyOptions)  # noqa: RUF009 (a field, see gelato.config)
    temperature: float = setting(0.0, "sampling temperature (0: greedy)")
    top_p: float = setting(1.0, "nucleus sampling mass in [0, 1] (0 or 1: off)")
    top_k: int = setting(0, "sample among the k likeliest tokens (0: off)")
    top_m: int = setting(DEFAULT_TOP_M, "draft support sent per token when sampling", check=(ge(1), le(MAX_Q_SUPPORT)))
    seed: int = setting(
        0,
        "seed of the drafter's and the edge's random draws (the same seed and prompt sample the same text: "
        "give independent samples their own seeds)",
    )
    no_chat_template: bool = setting(False, "send the prompt text as the tokenizer encodes it (its BOS, if any)")
    connect_timeout_s: float = setting(
        10.0,
        "how long to wait for the edge to answer before reporting it unreachable",
        check=(gt(0), le(MAX_TIMEOUT_S)),
    )
    edge_wait_s: float = setting(
        60.0,
        "wait this long at most for an edge that is coming back: at start one still loading its model, in a "
        "failover one restarting (gone, then loading) after a re-open failed or before the last one; 0: never wait",
        check=ge(0),
    )
    verdict_timeout_s: float = setting(
        120.0,
        "end a generation DEADLINE_EXCEEDED when the edge sends no answer, or takes no message, this long "
        "(a hung edge; not failed over)",
        check=(gt(0), le(MAX_TIMEOUT_S)),
    )
    session_deadline_s: float = setting(
        3600.0,
        "the longest one session (one prompt's stream to the edge) may last",
        check=(gt(0), le(MAX_TIMEOUT_S)),
    )
    # Security (gelato.security): TLS when any of --tls, --tls-ca, --tls-cert/--tls-key or
    # --tls-server-name is given; a token goes in plaintext only to loopback, or with --insecure.
    tls: bool = setting(False, "connect with TLS, trusting gRPC's default CA roots unless --tls-ca is given")
    tls_ca: str | None = setting(None, "PEM CA that signed the edge's certificate: connect with TLS", check=FILE_PATH)
    tls_cert: str | None = setting(
        None, "PEM client certificate, for an edge that requires one (mTLS)", check=FILE_PATH
    )
    tls_key: str | None = setting(None, "PEM private key of --tls-cert", check=FILE_PATH)
    tls_server_name: str | None = setting(
        None, "name in the edge's certificate, if not --edge's host: connect with TLS", check=HOST_NAME
    )
    auth_token_file: str | None = setting(None, "file holding the edge's bearer token", check=FILE_PATH)
    insecure: bool = setting(
        False,
        "send --auth-token-file's token to a non-loopback --edge without TLS (anyone on the path can read it)",
    )
    fail_fast: bool = setting(False, "stop at the first prompt that fails (default: report it, go on)")
    json: bool = setting(False, "one JSON object per prompt on stdout")
    meter: str = setting("auto", "energy meter: auto, nvml, rapl, jetson, cpu-model, replay:FILE or none")
    device_profile: str = setting(DEFAULT_PROFILE, "device class of the cpu-model estimate", choices=sorted(PROFILES))
    radio: str = setting("wifi", "radio energy model", choices=[*sorted(RADIOS), "none"])
    radio_up_mbit: float = setting(
        0.0, "uplink rate the radio model assumes, Mbit/s (0: the model's own: wifi 50, lte 10, 5g 100)", check=ge(0)
    )
    radio_down_mbit: float = setting(
        0.0, "downlink rate the radio model assumes, Mbit/s (0: the model's own: wifi 50, lte 30, 5g 400)", check=ge(0)
    )
    trace: Path | None = setting(None, "write one JSON line per round here")  # noqa: RUF009 (a field, see gelato.config)
    dtype: str = model_dtype()
    device: str = model_device()
    threads: int | None = torch_threads()
    log_level: str = log_level()
    log_format: str = log_format()

    def __post_init__(self) -> None:
        # No --policy: a budget asks for the policy that keeps it (the controller with the entropy
        # exit), as `gelato-device --drafter M --edge E --energy-budget-j-per-token 0.4` reads;
        # without one, the plain speculative baseline.
        if self.policy == "auto":  # a value given empty is not this: parse_policy refuses it
            chosen = "gelato" if self.controller.budget_j_per_token is not None else DEFAULT_POLICY
            object.__setattr__(self, "policy", chosen)

    @property
    def uses_tls(self) -> bool:
        """TLS to the edge: asked for by --tls or implied by any other TLS setting."""
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key or self.tls_server_name)

    @property
    def sampling(self) -> SamplingParams:
        """The sampling settings as the edge gets them: temperature and top_p rounded to the wire's
        float32, so the drafter (and an in-process verifier) use the very values the edge does (a
        top_p of 0.9 against 0.9f could keep one more token at a nucleus boundary)."""
        return SamplingParams(
            temperature=_wire_float(self.temperature), top_p=_wire_float(self.top_p), top_k=self.top_k, seed=self.seed
        )

    def _check_policy_settings(self, name: str) -> None:
        """A policy's own setting changed for a policy that never reads it is refused: the user
        meant something (e.g. `--entropy-threshold 2` hoping to tune gelato, whose entropy rule is
        calibrated, or `--v` for a fixed K)."""
        c, default = self.controller, PolicyOptions()
        readers = {
            "--entropy-threshold": (c.entropy_threshold != default.entropy_threshold, ("entropy",)),
            "--adaedl-gamma": (c.adaedl_gamma != default.adaedl_gamma, ("adaedl",)),
            "--adaedl-lambda": (c.adaedl_lambda != default.adaedl_lambda, ("adaedl",)),
            "--v": (c.v != default.v, ("lyapunov", "gelato")),
            # Other policies decide without the estimates (only their trace's p̂ and wasted_j would move).
            "--estimator-halflife-rounds": (c.halflife_rounds != default.halflife_rounds, ("lyapunov", "gelato")),
            "--calibrator-halflife-tokens": (
                c.calibrator_halflife_tokens != default.calibrator_halflife_tokens,
                ("lyapunov", "gelato"),
            ),
            "--stream-tokens": (c.stream_tokens != default.stream_tokens, ("ar-edge",)),
        }
        for flag, (changed, policies) in readers.items():
            require(
                not changed or name in policies,
                f"{flag} is read by --policy {' and '.join(policies)} only; --policy {name} would ignore it",
            )
        require(
            c.v == default.v or c.budget_j_per_token is not None,
            "--v weighs throughput against the energy deficit; without --energy-budget-j-per-token there is none "
            f"(--policy {name} then maximises throughput, whatever V)",
        )
        require(
            c.ahead_blocks == default.ahead_blocks or c.pipeline == "send-ahead",
            f"--ahead-blocks is read with --pipeline send-ahead only (here --pipeline {c.pipeline})",
        )

    def _check_sampling_settings(self) -> None:
        """Greedy decoding draws nothing: a truncation, support size or seed given for it would be
        ignored (0 and 1 are top-p's own "off")."""
        if not self.sampling.greedy:
            return
        ignored = [
            flag
            for flag, changed in (
                ("--top-p", 0.0 < self.top_p < 1.0),
                ("--top-k", self.top_k != 0),
                ("--top-m", self.top_m != DEFAULT_TOP_M),
                ("--seed", self.seed != 0),
            )
            if changed
        ]
        require(
            not ignored,
            f"{', '.join(ignored)} shape{'s' if len(ignored) == 1 else ''} sampling only; --temperature 0 "
            f"decodes greedily and would ignore {'it' if len(ignored) == 1 else 'them'} (give a temperature to sample)",
        )

    def check(self) -> None:
        try:
            policy = parse_policy(self.policy, self.controller)
            # The values given (their float32 rounding is checked there, naming what was given).
            SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed).validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        # Settings that would be silently ignored are refused instead: the user meant something.
        require(self.limit is None or self.prompts_file is not None, "--limit counts the prompts of --prompts-file")
        require(bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together")
        self._check_policy_settings(policy.name)
        self._check_sampling_settings()
        require(
            self.controller.pipeline == "off" or not (policy.local_only or policy.edge_streams),
            f"--pipeline {self.controller.pipeline} pipelines drafting; --policy {policy.name} drafts nothing for "
            "an edge (use --pipeline off)",
        )
        sends_drafts = policy.drafts and not (policy.local_only or policy.edge_streams)
        require(
            self.controller.k_max == PolicyOptions().k_max or sends_drafts,
            f"--k-max caps the drafts a round sends for verification; --policy {policy.name} sends none",
        )
        require(
            self.top_m == DEFAULT_TOP_M or policy.drafts,
            f"--top-m shapes the drafter's sampled drafts; --policy {policy.name} drafts none",
        )
        require(
            self.controller.pipeline != "local" or policy.drafts,
            f"--pipeline local pre-drafts the next block during a verdict; --policy {policy.name} drafts "
            "nothing (--pipeline send-ahead sends its empty blocks ahead)",
        )
        require(
            self.device_profile == DEFAULT_PROFILE or self.meter in ("auto", "cpu-model"),
            f"--device-profile shapes the cpu-model estimate; --meter {self.meter} never uses it",
        )
        require(
            self.radio != "none" or not (self.radio_up_mbit or self.radio_down_mbit),
            "--radio-up-mbit and --radio-down-mbit set the radio model's link rates; --radio none models no radio",
        )
        require(
            self.meter != "none" or self.controller.budget_j_per_token is None,
            "--energy-budget-j-per-token needs energy readings, and --meter none reads none (every round's "
            "energy would be unknown: the budget would never be charged)",
        )
