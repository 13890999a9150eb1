"""The virtual energy-deficit queue of the drift-plus-penalty controller.

Contract: `DeficitQueue(budget_j_per_token)`; `update(e_j, n_tokens)` applies
`Q ← max(Q + E_r − ē·N_r, 0)` and returns the new Q (joules). Keeping Q stable keeps the long-run
energy per token at or below ē: summed over rounds, `Q_R ≥ Σ E_r − ē·Σ N_r`, so the overshoot of
the budget after R rounds is at most `Q_R / Σ N_r` joules per token. A round whose energy could not
be measured (NaN) leaves Q unchanged and is counted in `unmeasured_rounds`: it is never taken as 0 J.
Pure arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class DeficitQueue:
    budget_j_per_token: float
    q_j: float = 0.0
    energy_j: float = 0.0  # measured energy of every update so far
    tokens: int = 0  # tokens of the measured rounds
    unmeasured_rounds: int = 0

    def __post_init__(self) -> None:
        if not (self.budget_j_per_token > 0 and math.isfinite(self.budget_j_per_token)):
            raise ValueError(f"the energy budget must be a positive number of J/token, got {self.budget_j_per_token}")

    def update(self, e_j: float, n_tokens: int) -> float:
        if not math.isfinite(e_j):
            self.unmeasured_rounds += 1
            return self.q_j
        self.q_j = max(self.q_j + e_j - self.budget_j_per_token * n_tokens, 0.0)
        self.energy_j += e_j
        self.tokens += n_tokens
        return self.q_j

    @property
    def q_tokens(self) -> float:
        """Q in tokens' worth of budget (Q / ē): the scale the objective works in."""
        return self.q_j / self.budget_j_per_token

    @property
    def j_per_token(self) -> float:
        """Long-run measured energy per token (NaN before any measured token)."""
        return self.energy_j / self.tokens if self.tokens else math.nan
