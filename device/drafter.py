"""The drafter runtime: drafts blocks from a persistent KV cache and rolls back to each verdict.

Contract: `start(prefix)` begins a generation; `draft(k, round, stop)` returns a `DraftBlock` of at
most k tokens (greedy ids, or sampled ids with the exact sparse q each was drawn from). After each
token it asks `stop(index, entropy, q)` — the drafter's own information only, so where a block ends
never changes what the target accepts (losslessness is untouched) — and it also stops after an eos
token; `DraftBlock.stop_reason` says why it stopped ("" when it reached k). `apply(block,
verdict)` moves the sequence to prefix + accepted + next token and drops drafter KV past the
accepted prefix. The cache always holds KV for a prefix of the accepted tokens, so the next round
feeds only what it has not seen (one token, or two after a fully accepted block: SPEC §9's
`[d_k, bonus]` pitfall).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import torch

from gelato.entropy import entropy_nats, entropy_of_probs
from gelato.kv import KVSequence
from gelato.models import LoadedModel
from gelato.sampling import process_logits, sample_sparse, truncate_top_m
from gelato.types import DraftBlock, SamplingParams, SparseDist, Verdict
from gelato.wire import derive_seed

DEFAULT_TOP_M = 32

# Per-token stop rule: (tokens drafted so far, entropy of the last one in nats, its q when sampling)
# -> a stop reason, or None to keep drafting.
StopRule = Callable[[int, float, SparseDist | None], str | None]


class Drafter:
    def __init__(self, loaded: LoadedModel, params: SamplingParams, top_m: int = DEFAULT_TOP_M) -> None:
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {top_m}")
        self.loaded = loaded
        self.params = params
        self.top_m = top_m
        self.generator = torch.Generator().manual_seed(derive_seed(params.seed, "drafter"))
        self.seq = KVSequence(loaded.model, loaded.vocab_size)

    def start(self, prefix_ids: list[int]) -> None:
        """Begin a generation after `prefix_ids` (prompt, or prompt + accepted when resuming)."""
        if not prefix_ids:
            raise ValueError("the prompt must have at least one token")
        self.seq = KVSequence(self.loaded.model, self.loaded.vocab_size, prefix_ids)
        self.generator.manual_seed(derive_seed(self.params.seed, "drafter"))

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens

    def _pick(self, logits: torch.Tensor) -> tuple[int, SparseDist | None, float]:
        """Next draft token, its exact q (sampling only) and the entropy of what it came from."""
        if self.params.greedy:
            return int(logits.argmax()), None, entropy_nats(logits)
        q = truncate_top_m(process_logits(logits, self.params), self.top_m)
        return sample_sparse(q, self.generator), q, entropy_of_probs(torch.tensor(q.probs))

    def draft(self, k: int, round_no: int, stop: StopRule | None = None, eos: Collection[int] = ()) -> DraftBlock:
        """Draft up to k tokens after the current sequence (k = 0: an empty block)."""
        t0 = time.perf_counter()
        base = len(self.seq.tokens)
        ids: list[int] = []
        qs: list[SparseDist] = []
        entropies: list[float] = []
        reason = ""
        if k > 0:
            logits = self.seq.forward()[-1]
            while True:
                x, q, h = self._pick(logits)
                ids.append(x)
                entropies.append(h)
                if q is not None:
                    qs.append(q)
                if x in eos:
                    reason = "eos"  # drafting past the drafter's own eos is wasted work
                elif stop is not None:
                    reason = stop(len(ids), h, q) or ""
                if reason or len(ids) == k:
                    break
                logits = self.seq.forward([x])[-1]
        # The last draft is not fed: its KV is only needed if it is accepted (next round feeds it).
        self._base = base
        return DraftBlock(
            round=round_no,
            ids=tuple(ids),
            q=tuple(qs),
            draft_s=time.perf_counter() - t0,
            entropies=tuple(entropies),
            stop_reason=reason,
        )

    def apply(self, block: DraftBlock, verdict: Verdict) -> list[int]:
        """Apply a verdict; returns the tokens this round emitted."""
        if not 0 <= verdict.n_accepted <= block.k:
            raise ValueError(f"verdict accepts {verdict.n_accepted} of {block.k} drafts")
        emitted = verdict.emitted(block.ids)
        self.seq.set_tail(self._base, emitted)
        return emitted
