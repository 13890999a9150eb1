"""The device's controller constants, written once: `PolicyOptions` (and `PIPELINE_MODES`).

Contract: a frozen `gelato.config.Settings` dataclass; its `setting` fields are `gelato-device`
options (flag, `--help` text, `GELATO_DEVICE_*` variable and bound, nested as
`DeviceConfig.controller`), its plain fields internal constants. The simulator and benchmarks build
it directly. `gelato.device.policy` reads it; no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from gelato.config import Settings, between, ge, gt, le, setting
from gelato.controller.calibrator import DEFAULT_CALIBRATOR_HALFLIFE_TOKENS
from gelato.controller.estimators import DEFAULT_HALFLIFE_ROUNDS
from gelato.wire import MAX_STREAMED_PER_MESSAGE

PIPELINE_MODES = ("off", "local", "send-ahead")


@dataclass(frozen=True)
class PolicyOptions(Settings):
    """Every controller constant, written once. The `setting` fields are also `gelato-device`
    options (flag, `--help` text, `GELATO_DEVICE_*` variable and bound: `DeviceConfig.controller`);
    `validate()` raises ValueError (`gelato.config.ConfigError`) naming the flag. Plain fields are
    internal constants."""

    k_max: int = setting(0, "hard cap on drafts per round (0: the edge's max_draft_tokens)", check=ge(0))
    budget_j_per_token: float | None = setting(
        None,
        "device energy budget ē in J/token: lyapunov and gelato decide by it, the other policies only "
        "track their deficit Q against it (default: none, pure throughput)",
        flag="--energy-budget-j-per-token",
        check=gt(0),
    )
    v: float = setting(
        20.0,
        "throughput weight V of lyapunov/gelato, in tokens of budget (the classic drift-plus-penalty V, "
        "in J², is this times the budget squared); used only with --energy-budget-j-per-token",
        check=gt(0),
    )
    entropy_threshold: float = setting(
        1.0, "entropy policy: stop after a token above this entropy τ, in nats (inf: never)", check=ge(0, finite=False)
    )
    adaedl_gamma: float = setting(0.2, "adaedl: γ", check=gt(0))
    adaedl_lambda: float = setting(0.6, "adaedl: stop when 1-sqrt(γH) < λ", check=between(0, 1))
    heuristic_start: int = 4
    halflife_rounds: float = setting(
        DEFAULT_HALFLIFE_ROUNDS,
        "half-life of the controller's time/energy/acceptance estimates, in rounds",
        flag="--estimator-halflife-rounds",
        check=gt(0),
    )
    calibrator_halflife_tokens: float = setting(
        DEFAULT_CALIBRATOR_HALFLIFE_TOKENS,
        "half-life of the entropy calibrator's counts p̂(accept | H), in observed drafts (shorter: follows a "
        "change of prompts sooner, noisier per entropy bin)",
        check=gt(0),
    )
    ar_device_block: int = 16  # tokens per local step of `ar-device`
    explore_every_rounds: int = 16  # without drafting, every this-many-th round drafts a block to re-measure
    explore_k: int = 4  # its size: long enough to measure per-token costs apart from per-block ones
    # Drafting nothing observes no acceptance: before this many drafts were verified, α̂ is too thin
    # to rule drafting out, and a round it would leave empty drafts all the same (`Lyapunov._outer`).
    min_observed_drafts: int = 32
    pipeline: str = setting(
        "off",
        "local: keep drafting while a block is in flight, a hit starts the next block at once; send-ahead: "
        "also send the next blocks before the verdict (the edge verifies them only if the block before was "
        "fully accepted with the guessed token), where the edge supports it (local where it does not)",
        choices=PIPELINE_MODES,
    )
    ahead_blocks: int = setting(2, "send-ahead: blocks in flight past the awaited one, at most", check=ge(1))
    stream_tokens: int = setting(
        32,
        "ar-edge: tokens the edge may send in one message, at most (1: each as it comes; more: less edge CPU "
        "per token, coarser streaming); it sends one a message while other sessions share its model",
        check=(ge(1), le(MAX_STREAMED_PER_MESSAGE)),
    )
