"""The drafter runtime: drafts blocks from a persistent KV cache and rolls back to each verdict.

Contract: `begin_generation(prompt)` keys a generation's draws (once, not per failover session: a
repeated prompt draws afresh); `start(prefix)` begins a session of it; `draft(k, round, stop)`
returns a `DraftBlock` of at most k tokens (greedy ids, or sampled ids with the exact sparse q each
was drawn from). After each
token it asks `stop(index, entropy, q)` — the drafter's own information only, so where a block ends
never changes what the target accepts (losslessness is untouched) — and it also stops after an eos
token; `DraftBlock.stop_reason` says why it stopped ("" when it reached k). `apply(block,
verdict)` moves the sequence to prefix + accepted + next token and drops drafter KV past the
accepted prefix. The cache always holds KV for a prefix of the accepted tokens, so the next round
feeds only what it has not seen (one token, or two after a fully accepted block: the last
draft `d_k` and the bonus token, neither of which is in the cache yet).

Pre-drafting (`--pipeline local`): while a block's verdict is in flight, `predraft(block, m, halt)`
keeps drafting after it as if the whole block will be accepted, until `halt` is set (the verdict
came) or m tokens. `apply` then keeps that work only on a hit — every draft accepted and the
target's token equal to the first pre-drafted one — and the next `draft` starts from the rest of
the pre-draft (its tokens, q and entropies, already computed, still passed through the stop rule);
on a miss the pre-drafted tokens and their KV are dropped. A pre-drafted token is an ordinary
draft, drawn from exactly the q it carries, so the output is unchanged either way.

Send-ahead (`--pipeline send-ahead`): blocks form a chain in flight. `draft_after(prev, k, ...)`
drafts the block that follows `prev` as if `prev` will be fully accepted: first the guess of
prev's target token (the drafter's own pick at that position), then up to k drafts after it, in
`DraftBlock.guess` and `ids`. `settle(block, verdict, next_block)` applies the verdict of the
oldest block of the chain: a hit (every draft accepted and the target's token equal to the next
block's guess) keeps the sequence as drafted; anything else cuts it back to the accepted tokens,
dropping every later block of the chain (the edge answers those stale). An empty send-ahead block
(`DraftBlock.follow`, sent when there is nothing to draft) holds nothing of the drafter's: the
block before it is settled as if it were the last one, and the chain goes on whatever its verdict.
Draws are keyed by token position, so a chain drafts exactly the tokens rounds one at a time would.

The guess check (either pipelining mode, `start(..., check_guesses=True)`): after a fully accepted
block that nothing was drafted after (no pre-draft token, no block sent ahead or dropped unsent),
the next block's first forward feeds that block's last draft and its target token and computes
both rows anyway; the first row gives the drafter's own guess of the target's token, drawn as a
pre-draft draws it, and `DraftBlock.bonus_guess_hit` says whether it was right. The drafts are
unchanged (the last row is `forward_last`'s, bit for bit). Not checked: a block followed by an
empty send-ahead block or by a block of K = 0, the generation's last block, guess-only blocks.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from gelato.device.config import DEFAULT_TOP_M
from gelato.entropy import entropy_nats, entropy_of_probs
from gelato.kv import KVSequence, check_rollback
from gelato.models import LoadedModel, ModelLoadError
from gelato.sampling import (
    KeyedRng,
    finite_logits,
    generation_seed,
    process_logits,
    sample_sparse,
    truncate_top_m,
)
from gelato.types import DraftBlock, SamplingParams, SparseDist, Verdict
from gelato.wire import MAX_Q_SUPPORT

log = logging.getLogger(__name__)

# Per-token stop rule: (tokens drafted so far, entropy of the last one in nats, its q when sampling)
# -> a stop reason, or None to keep drafting.
StopRule = Callable[[int, float, SparseDist | None], str | None]


@dataclass(frozen=True)
class Predraft:
    """Tokens drafted ahead of a verdict, with what the wire and the controller need of each."""

    ids: tuple[int, ...]
    q: tuple[SparseDist, ...]
    entropies: tuple[float, ...]

    def rest(self) -> Predraft:
        return Predraft(self.ids[1:], self.q[1:], self.entropies[1:])


_NO_PREDRAFT = Predraft((), (), ())


def check_drafter(loaded: LoadedModel) -> None:
    """`ModelLoadError` for a model the drafter cannot roll back after a rejection (linear
    attention, Mamba and other recurrent layers: `gelato.kv.check_rollback`), at load, not as a
    traceback in the first generation."""
    try:
        check_rollback(loaded.model, loaded.vocab_size)
    except ValueError as exc:
        raise ModelLoadError(f"drafter {loaded.name!r}: {exc}") from None


class Drafter:
    def __init__(self, loaded: LoadedModel, params: SamplingParams, top_m: int = DEFAULT_TOP_M) -> None:
        if not 1 <= top_m <= MAX_Q_SUPPORT:  # the edge refuses a larger q at the first sampled block
            raise ValueError(f"top_m must be in [1, {MAX_Q_SUPPORT}], got {top_m}")
        self.loaded = loaded
        self.params = params
        self.top_m = top_m
        # Draws keyed by token position and the prefix drafted after: a generation re-opened on
        # another edge (failover) drafts exactly what it would have drafted uninterrupted, and a
        # position drafted again after a cut gets a fresh draw (`gelato.sampling`: why it must).
        self.rng = KeyedRng(params.seed, "drafter")
        self._generations: collections.Counter[int] = collections.Counter()  # per prompt: `begin_generation`
        self.seq = KVSequence(loaded.model, loaded.vocab_size)
        self._predraft: Predraft | None = None  # drafted ahead of the verdict in flight
        self._carry: Predraft | None = None  # a hit's leftover: the next block's first drafts
        self._bases: dict[int, int] = {}  # send-ahead: round -> position of its first draft
        self.predraft_s = 0.0  # how long the last `predraft` drafted
        self._warned_nonfinite = False  # `_finite` says so once
        # Pipelining: check, in the next block's first forward, the drafter's guess of a fully
        # accepted block's target token where nothing made that guess (`_forward_checking_guess`);
        # set by `start`.
        self.check_guesses = False
        # The last verdict fully accepted a block nothing was pre-drafted after. A block sent
        # ahead after it, or dropped unsent, fed its last draft (`draft_after`), so the check in
        # `draft` also asks that both that draft and the target's token are still uncached.
        self._guess_due = False

    def begin_generation(self, prompt_ids: list[int]) -> int:
        """Once per generation (a failover's sessions are the same generation): how many of this
        prompt this drafter made before. A repeat draws afresh, keyed by `generation_seed(seed,
        prompt, repeat)`, so that `--prompt X --prompt X` samples twice (the edge's seed follows
        the same count); the first generation of a prompt keeps `--seed` as its key."""
        first = generation_seed(self.params.seed, prompt_ids)
        repeat = self._generations[first]
        self._generations[first] += 1
        seed = generation_seed(self.params.seed, prompt_ids, repeat) if repeat else self.params.seed
        self.rng = KeyedRng(seed, "drafter")
        return repeat

    def start(self, prefix_ids: list[int], prefill: bool = True, check_guesses: bool = False) -> None:
        """Begin a generation after `prefix_ids` (prompt, or prompt + accepted when resuming).
        `prefill=False` (a policy that never drafts: `fixed-0`, `ar-edge`), or a prefix that
        fills the drafter's window (`LoadedModel.context_limit`: nothing can be drafted after it,
        `Limits.draft_room`, and past it absolute position embeddings fail): the prompt is not
        prefilled, since the generation runs at K = 0 and the prefill would cost the device time,
        energy and KV for nothing (and delay the first round: for `ar-edge`, the edge's start).
        Without the prefill no model work is needed here: the caller may run it inline.
        `check_guesses` (pipelining): blocks report `DraftBlock.bonus_guess_hit`."""
        if not prefix_ids:
            raise ValueError("the prompt must have at least one token")
        self.seq = KVSequence(self.loaded.model, self.loaded.vocab_size, prefix_ids)
        # The prompt's KV now, not inside the first round: a round's drafting time is then drafting
        # (the controller's per-block estimate would otherwise carry the prefill of every prompt).
        if prefill and len(prefix_ids) < self.loaded.context_limit:
            self.seq.prefill(len(prefix_ids) - 1)
        self._predraft = self._carry = None
        self._bases = {}
        self.check_guesses, self._guess_due = check_guesses, False

    def _carried_fed(self) -> int:
        """Carried tokens already in the sequence (all but the last: it is fed when drafting on)."""
        return max(len(self._carry.ids) - 1, 0) if self._carry else 0

    @property
    def tokens(self) -> list[int]:
        """The accepted sequence (prompt + emitted), without tokens carried for the next block."""
        fed = self._carried_fed()
        return self.seq.tokens[: len(self.seq.tokens) - fed] if fed else self.seq.tokens

    def _pick(self, logits: torch.Tensor, position: int) -> tuple[int, SparseDist | None, float, torch.Tensor | None]:
        """The draft token at `position` (in the generation), its exact q (sampling only), the
        entropy of what it came from, and (greedy) the token as a `[1, 1]` tensor on the model's
        device, ready to be fed next (`KVSequence.forward_last`'s `feed`)."""
        if self.params.greedy:
            h = entropy_nats(logits)
            if not math.isfinite(h):  # a NaN or +inf logit (it made every probability NaN)
                logits = self._finite(logits, position)
                h = entropy_nats(logits)
            top = logits.argmax()
            return int(top), None, h, top.view(1, 1)
        x, q = self._sample(logits, position)
        return x, q, entropy_of_probs(torch.tensor(q.probs)), None

    def _sample(self, logits: torch.Tensor, position: int) -> tuple[int, SparseDist]:
        """The sampled draft at `position` and its exact q: the draw keyed by position and prefix."""
        if not bool(torch.isfinite(logits.max())):  # a NaN (max keeps it) or +inf: every probability NaN
            logits = self._finite(logits, position)
        q = truncate_top_m(process_logits(logits, self.params), self.top_m)
        return sample_sparse(q, self.rng.uniform(position, prefix=self.seq.tokens[:position])), q

    def _finite(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        """`finite_logits`, said once per drafter; a row with nothing finite left is an error."""
        what = f"the drafter's logits at position {position} ({str(self.loaded.dtype).removeprefix('torch.')})"
        finite = finite_logits(logits)
        if finite is None:
            raise ValueError(f"{what} are all NaN or -inf: the drafter is broken (try --dtype float32)")
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            log.warning(
                "%s hold NaN or inf (an overflow?): drafting from their finite part; a float32 or "
                "bfloat16 drafter (--dtype) avoids float16 overflow",
                what,
            )
        return finite

    def draft(self, k: int, round_no: int, stop: StopRule | None = None, eos: Collection[int] = ()) -> DraftBlock:
        """Draft up to k tokens after the current sequence (k = 0: an empty block)."""
        t0 = time.perf_counter()
        carry, self._carry = self._carry or _NO_PREDRAFT, None
        seq = self.seq
        base = len(seq.tokens) - max(len(carry.ids) - 1, 0)
        ids: list[int] = []
        qs: list[SparseDist] = []
        entropies: list[float] = []
        reason = ""
        feed: torch.Tensor | None = None  # the newest draft on the device (greedy), fed next
        # The last block's last draft and target token both uncached: nothing guessed the latter.
        check, self._guess_due = self._guess_due and not carry.ids and len(seq.tokens) - seq.cached == 2, False
        guess_hit: bool | None = None
        with torch.inference_mode():  # one scope for the block, not one per forward
            while len(ids) < k:
                if len(ids) < len(carry.ids):  # drafted ahead of the last verdict: no forward needed
                    x, h = carry.ids[len(ids)], carry.entropies[len(ids)]
                    q = carry.q[len(ids)] if carry.q else None
                elif check:
                    logits, guess_hit = self._forward_checking_guess()
                    x, q, h, feed = self._pick(logits, base)
                    check = False
                else:  # the sequence is base + ids[:-1]: feed the newest draft (or the round's token)
                    logits = seq.forward_last((ids[-1],) if ids else (), feed if ids else None)
                    x, q, h, feed = self._pick(logits, base + len(ids))
                ids.append(x)
                entropies.append(h)
                if q is not None:
                    qs.append(q)
                # The stop rule hears every draft (its p̂ goes to the trace), an eos too: drafting
                # past the drafter's own eos is wasted work, whatever the rule says.
                ruled = (stop(len(ids), h, q) or "") if stop is not None else ""
                reason = "eos" if x in eos else ruled
                if reason:
                    break
        if len(seq.tokens) > base + max(len(ids) - 1, 0):  # carried tokens this block did not use
            seq.truncate(base + max(len(ids) - 1, 0))
        # The last draft is not fed: its KV is only needed if it is accepted (next round feeds it).
        self._base = self._bases[round_no] = base
        return DraftBlock(
            round=round_no,
            ids=tuple(ids),
            q=tuple(qs),
            draft_s=time.perf_counter() - t0,
            entropies=tuple(entropies),
            stop_reason=reason,
            carried=min(len(ids), len(carry.ids)),
            bonus_guess_hit=guess_hit,
        )

    def _forward_checking_guess(self) -> tuple[torch.Tensor, bool]:
        """The block's first forward after a fully accepted block that nothing was drafted past: it
        feeds that block's last draft and its target token, and computes both rows anyway
        (`KVSequence.forward_last` keeps only the last). The first row is where a pre-draft or a
        block sent ahead would have guessed the target's token: the guess is drawn from it as those
        draw theirs (the same keyed draw when sampling), so the guess-match rate the controller
        prices pipelining with is measured on every such block, not only on those it chose to
        pipeline (from those alone a low rate could never recover). Returns the last row (bit for
        bit `forward_last`'s) and whether the guess was the target's token."""
        rows = self.seq.forward()
        pos = len(self.seq.tokens) - 1  # the target's token
        return rows[-1], self._guess(rows[-2], pos) == self.seq.tokens[pos]

    def _guess(self, logits: torch.Tensor, position: int) -> int:
        """`_pick`'s token alone (no entropy, no tensor to feed): the check's guess."""
        if self.params.greedy:
            top = logits.argmax()  # a NaN or +inf there: the row is not finite, pick as `_pick` does
            return int(top) if bool(torch.isfinite(logits[top])) else int(self._finite(logits, position).argmax())
        return self._sample(logits, position)[0]

    def forwards_needed(self, k: int) -> bool:
        """Whether `draft(k, ...)` would run the model: False when it drafts nothing, or only
        tokens carried from the last pre-draft (the loop then need not leave its thread)."""
        return k > (len(self._carry.ids) if self._carry else 0)

    def apply(self, block: DraftBlock, verdict: Verdict) -> list[int]:
        """Apply a verdict; returns the tokens this round emitted."""
        if not 0 <= verdict.n_accepted <= block.k:
            raise ValueError(f"verdict accepts {verdict.n_accepted} of {block.k} drafts")
        emitted = verdict.emitted(block.ids)
        self._bases.pop(block.round, None)  # settled: one round at a time keeps none (send-ahead: `settle`)
        pre, self._predraft = self._predraft, None
        if pre is not None and self.predraft_hit(block, verdict, pre) and len(pre.ids) > 1:
            # Keep the pre-draft's KV: the sequence goes on with y1 (= the target's token) and the
            # fed pre-drafted tokens; the next block starts with y2..ym.
            self.seq.set_tail(self._base, emitted + list(pre.ids[1:-1]))
            self._carry = pre.rest()
        else:
            self.seq.set_verdict(self._base, emitted[:-1], emitted[-1])
        # Due only where no pre-draft token was drafted (one that was made the guess, and counts).
        self._guess_due = self.check_guesses and 0 < block.k == verdict.n_accepted and not (pre and pre.ids)
        return emitted

    def draft_after(
        self,
        prev: DraftBlock,
        k: int,
        round_no: int,
        stop: StopRule | None = None,
        eos: Collection[int] = (),
        on_guess: Callable[[int], bool] | None = None,
    ) -> DraftBlock:
        """Send-ahead: the block after `prev` (the newest of the chain) as if `prev` will be fully
        accepted: the guess of prev's target token, then up to k drafts (the stop rule and eos end
        them early, as in `draft`; a guess that is eos gets no drafts). `on_guess` hears the guess
        as soon as it is drawn and answers whether the block is lost already (the awaited verdict
        came and cuts the chain, or shows the guess wrong): then it gets no drafts at all, stop
        reason "cut". Never after an empty send-ahead block (its target token is not the drafter's
        to guess)."""
        if prev.follow:
            raise ValueError("no drafts after an empty send-ahead block: its target token is unknown")
        t0 = time.perf_counter()
        pos = self._bases[prev.round] + prev.k  # where prev's target token (the guess) will sit
        tail = prev.ids[-1] if prev.k else prev.guess  # the chain's newest token, not fed yet
        seq = self.seq
        with torch.inference_mode():  # one scope for the block, not one per forward
            guess, _, _, feed = self._pick(seq.forward_last(() if tail is None else (tail,)), pos)
            lost = on_guess is not None and on_guess(guess)
            base = pos + 1
            ids: list[int] = []
            qs: list[SparseDist] = []
            entropies: list[float] = []
            reason = "cut" if lost else "eos" if guess in eos else ""
            while len(ids) < k and not reason:
                x, q, h, feed = self._pick(seq.forward_last((ids[-1] if ids else guess,), feed), base + len(ids))
                ids.append(x)
                entropies.append(h)
                if q is not None:
                    qs.append(q)
                ruled = (stop(len(ids), h, q) or "") if stop is not None else ""  # every draft, as in `draft`
                reason = "eos" if x in eos else ruled
        self._bases[round_no] = base
        return DraftBlock(
            round=round_no,
            ids=tuple(ids),
            q=tuple(qs),
            draft_s=time.perf_counter() - t0,
            entropies=tuple(entropies),
            stop_reason=reason,
            guess=guess,
        )

    def settle(self, block: DraftBlock, verdict: Verdict, next_block: DraftBlock | None) -> tuple[list[int], bool]:
        """Send-ahead: apply the verdict of the chain's oldest `block`; `next_block` is the one
        drafted after it (None: none). Returns the tokens the round emitted and whether the chain
        goes on (a hit); on a miss every later block of the chain is dropped."""
        if not 0 <= verdict.n_accepted <= block.k:
            raise ValueError(f"verdict accepts {verdict.n_accepted} of {block.k} drafts")
        base = self._bases.pop(block.round)
        emitted = verdict.emitted(block.ids)
        self._guess_due = False
        if block.guess is not None and len(self.seq.tokens) < base:
            # A guess-only block (k = 0) that nothing was drafted after: its guess, which sits at
            # base - 1 and was right (the block was verified, not stale), was never fed.
            self.seq.set_tail(base - 1, [block.guess])
        if next_block is not None and next_block.follow:  # it follows any outcome: only its start is new
            self.seq.set_verdict(base, emitted[:-1], emitted[-1])
            self._bases = {next_block.round: base + len(emitted)}
            return emitted, True
        if next_block is not None and verdict.n_accepted == block.k and next_block.guess == verdict.next_token:
            return emitted, True  # the sequence already goes on with exactly these tokens
        self.seq.set_verdict(base, emitted[:-1], emitted[-1])
        self._bases = {r: b for r, b in self._bases.items() if r < block.round}
        self._guess_due = self.check_guesses and next_block is None and 0 < block.k == verdict.n_accepted
        return emitted, False

    @staticmethod
    def predraft_hit(block: DraftBlock, verdict: Verdict, pre: Predraft) -> bool:
        return verdict.n_accepted == block.k and bool(pre.ids) and pre.ids[0] == verdict.next_token

    def predraft(self, block: DraftBlock, max_tokens: int, halt: threading.Event, eos: Collection[int] = ()) -> int:
        """Draft up to `max_tokens` after `block` as if it will be fully accepted, until `halt` is
        set; returns how many. Runs on the drafter thread while the verdict is in flight."""
        self._predraft, self.predraft_s = None, 0.0
        if block.k == 0 or max_tokens < 1 or block.ids[-1] in eos:
            return 0
        t0 = time.perf_counter()
        ids: list[int] = []
        qs: list[SparseDist] = []
        hs: list[float] = []
        seq = self.seq
        feed: torch.Tensor | None = None
        with torch.inference_mode():  # one scope for the pre-draft, not one per forward
            while len(ids) < max_tokens and not halt.is_set() and not (ids and ids[-1] in eos):
                # The block's last draft was not fed by `draft`: it goes first.
                logits = seq.forward_last((ids[-1] if ids else block.ids[-1],), feed)
                y, q, h, feed = self._pick(logits, self._base + block.k + len(ids))
                ids.append(y)
                hs.append(h)
                if q is not None:
                    qs.append(q)
        self._predraft = Predraft(tuple(ids), tuple(qs), tuple(hs))
        self.predraft_s = time.perf_counter() - t0
        return len(ids)

    @property
    def last_predraft(self) -> Predraft | None:
        return self._predraft
