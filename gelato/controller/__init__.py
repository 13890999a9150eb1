"""The GELATO controller: pure math, no I/O, no torch.

- `queue`: the virtual energy-deficit queue `Q ← max(Q + E_r − ē·N_r, 0)`.
- `estimators`: online (exponentially weighted) estimates of a round's time and energy as a
  function of the number of drafted tokens, and of the per-token acceptance.
- `calibrator`: p̂(accept | entropy), learned online from verdicts.
- `objective`: the drift-plus-penalty objective, the outer decision K_ref (§5.3) and the inner
  continuation rule on the survival S_i (§5.4); whether pre-drafting during a round trip pays.

The device's policies (`gelato.device.policy`) compose these; the simulator (`gelato.benchmarks.simulate`)
replays recorded traces through the very same objects.
"""

from gelato.controller.calibrator import EntropyCalibrator
from gelato.controller.estimators import CostEstimator, CostModel, EwLinear, Ewma
from gelato.controller.objective import (
    Decision,
    Objective,
    chain_frame,
    cheapest_k,
    choose_chain_k,
    choose_k_ref,
    expected_emitted,
    keep_drafting,
    predraft_pays,
    tokens_per_s,
)
from gelato.controller.queue import DeficitQueue

__all__ = [
    "CostEstimator",
    "CostModel",
    "Decision",
    "DeficitQueue",
    "EntropyCalibrator",
    "EwLinear",
    "Ewma",
    "Objective",
    "chain_frame",
    "cheapest_k",
    "choose_chain_k",
    "choose_k_ref",
    "expected_emitted",
    "keep_drafting",
    "predraft_pays",
    "tokens_per_s",
]
