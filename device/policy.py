"""Draft-length policies: how many tokens to draft this round.

Contract: `parse_policy(text)` turns a CLI name into a `Policy`; `Policy.block_size()` returns the
K for the next round and `Policy.observe(k, accepted)` feeds back each verdict. Only `fixed-K` is
implemented so far; the controller policies of SPEC §5.5 plug in behind the same interface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class Policy:
    name = "policy"

    def block_size(self) -> int:
        raise NotImplementedError

    def observe(self, k: int, accepted: int) -> None:
        """Feedback after each verdict (fixed-K ignores it)."""


@dataclass
class FixedK(Policy):
    k: int

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"fixed-{self.k}"

    def block_size(self) -> int:
        return self.k


def parse_policy(text: str) -> Policy:
    m = re.fullmatch(r"fixed-(\d+)", text.strip())
    if m:
        return FixedK(int(m.group(1)))
    raise ValueError(f"unknown policy {text!r}; available: fixed-K (K >= 0, e.g. fixed-4)")
