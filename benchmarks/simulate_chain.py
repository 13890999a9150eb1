"""Send-ahead pipelining in the simulator (`gelato.benchmarks.simulate`, `Spec(pipeline="send-ahead")`):
`gelato.device.pipeline.pipelined_generate` replayed on a trace and a simulated clock.

Contract: `SendAhead._generate_chain(trace)` runs one generation: the device drafts one thing at a
time; while the oldest verdict is out it drafts the next block of the chain (a guess + drafts)
when `Policy.send_ahead` says so, up to `ahead_blocks` past the awaited one, and sends it; one
ordered stream (`_Wire`) where the edge verifies one block at a time (a stale block is answered at
once, without compute) and each block and verdict takes half the round trip (plus its transfer)
one way. Each verdict is one round of telemetry, recorded through `DeviceCore._record`; a block
(`_Block`) hits (`_chain_hit`) when its parent is fully accepted and its guess right.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, replace

from gelato.benchmarks.simulate_model import Trace
from gelato.benchmarks.simulate_rounds import DeviceCore, _block_end, _draft
from gelato.controller import Decision
from gelato.device.policy import Gate
from gelato.types import DraftBlock, Telemetry


@dataclass
class _Block:
    """A block of the send-ahead chain: drafts at output positions pos..pos+k-1 (an ahead block's
    guess sits at pos − 1), and its timeline."""

    pos: int
    k: int
    reason: str
    decision: Decision
    gate: Gate | None
    cap: int
    wanted: int
    draft_s: float
    ahead: bool  # drafted before its parent's verdict, with a guess (or empty: `follow`)
    guess_ok: bool  # its guess is the target's token (always True for a block that is not ahead)
    verified: bool  # the edge verifies it (every block before it in the chain a hit); else stale
    view: DraftBlock  # what `Policy.p_hit` sees (the drafts' entropies)
    sent_at: float = 0.0
    edge_s: float = 0.0
    verdict_at: float = 0.0
    up: int = 0
    down: int = 0
    follow: bool = False  # empty, sent ahead: the target's next token whatever its parent gives
    drafted_after: bool = False  # a block was drafted after it (sent or not): its guess is known
    guess_hit: bool | None = None  # `DraftBlock.bonus_guess_hit`: the guess check of the block before
    early: bool = False  # `Telemetry.sent_ahead`: sent while its parent's verdict was still out


@dataclass
class _Wire:
    """One session's ordered stream: the edge verifies its blocks one after another."""

    up_last: float = 0.0  # when the last block reached the edge
    edge_free: float = 0.0  # when the edge finished the last block
    verdict_last: float = 0.0  # when the last verdict reached the device


def _chain_hit(trace: Trace, block: _Block, successor: _Block) -> bool:
    """`gelato.device.pipeline._hit`: `block` fully accepted and the guess of `successor` right."""
    return successor.follow or (min(trace.run[block.pos], block.k) == block.k and successor.guess_ok)


class SendAhead(DeviceCore):
    """`--pipeline send-ahead`: a device's generation as a chain of blocks in flight."""

    def _generate_chain(self, trace: Trace) -> None:
        """`gelato.device.pipeline.pipelined_generate` on the trace, on a simulated clock: a chain of
        blocks in flight over one ordered stream. The device drafts one thing at a time; the edge
        verifies one block at a time in stream order (a stale block is answered at once, without
        compute); each block and verdict takes half the round trip (plus its transfer) one way."""
        assert self.policy is not None
        policy, m = self.policy, self.model
        max_ahead = policy.options.ahead_blocks
        policy.ahead_blocks = max_ahead  # as `pipelined_generate` sets it
        wire = _Wire()
        chain: deque[_Block] = deque()
        now = last = 0.0  # the device's clock; the previous verdict's time
        busy = 0.0  # drafting seconds since the previous verdict
        pos, r = 0, 0
        self._guess_due = None
        unsent, unsent_s, stale_down, dropped = 0, 0.0, 0, 0
        ends_after: _Block | None = None  # `_Chain.ends_after`: the chain ends after this block
        while pos < trace.n:
            if not chain:
                limit = self._limit(trace, pos)
                if limit < 0:
                    return
                block, cost_s = self._chain_block(trace, pos, limit, r, None)
                now, busy = now + block.draft_s, busy + block.draft_s
                self.totals.controller_s += cost_s
                self._send(block, now, wire)
                chain.append(block)
            while chain[0].verdict_at > now and len(chain) <= max_ahead:
                prev = chain[-1]
                nxt = prev.pos + prev.k + 1
                limit = self._limit(trace, nxt)
                if prev.reason == "eos" or prev is ends_after or limit < 0:
                    break  # the chain ends at an eos or at the generation's limits
                if limit == 0 and not all(b.k == 0 and (b.follow or not b.ahead) for b in chain):
                    break  # as `gelato.device.pipeline._extend`: a miss may leave room, wait for it
                t0 = time.perf_counter()
                decision = policy.decide(limit)
                wanted = decision.k_max if policy.gate(decision) else decision.k_ref
                if max(0, min(wanted, limit)) == 0:  # the policy drafts nothing: an empty block, whatever comes
                    self.totals.controller_s += time.perf_counter() - t0
                    block = self._follow(nxt, r + len(chain), prev, decision, wanted)
                    self._send(block, now, wire)
                    chain.append(block)
                    continue
                p_chain = math.prod(policy.p_hit(b.view) for b in chain)
                first = len(chain) == 1 and not chain[0].ahead  # as `_extend`: a chain's start
                go = not prev.follow and policy.send_ahead(decision, p_chain, first)
                self.totals.controller_s += time.perf_counter() - t0
                if not go:
                    break
                block, cost_s = self._chain_block(trace, nxt, limit, r + len(chain), (prev, decision))
                if chain[0].verdict_at < now + block.draft_s and self._cuts(trace, chain, block):
                    block = self._cut_short(block, chain[0].verdict_at - now)
                now, busy = now + block.draft_s, busy + block.draft_s
                self.totals.controller_s += cost_s
                if chain[0].verdict_at <= now:  # the verdict came while drafting: still worth sending?
                    after = chain[1] if len(chain) > 1 else block
                    if not _chain_hit(trace, chain[0], after):
                        unsent, unsent_s = unsent + block.k + 1, unsent_s + block.draft_s
                        dropped = block.k + 1 if after is block else 0  # this round's pre-draft, a miss
                        self.totals.unsent += 1
                        break
                if block.k == 0 and block.reason == "eos":  # its guess is the end token: not sent
                    unsent, unsent_s = unsent + 1, unsent_s + block.draft_s
                    self.totals.unsent += 1
                    ends_after = prev
                    break
                self._send(block, now, wire)
                chain.append(block)
            now = max(now, chain[0].verdict_at)
            sent = chain.popleft()
            successor = chain[0] if chain else None
            hit = successor is not None and _chain_hit(trace, sent, successor)
            cut = [] if hit else list(chain)
            if cut:
                chain.clear()
            wasted = sum(b.k + (not b.follow) for b in cut) + unsent  # an empty block drafted nothing
            self._waste(wasted, sum(b.draft_s for b in cut) + unsent_s)
            unsent, unsent_s = 0, 0.0
            accepted = min(trace.run[sent.pos], sent.k)
            emitted = min(accepted + 1, trace.n - pos)
            unguessed = successor is None and not sent.drafted_after and 0 < sent.k == accepted
            self._guess_due = sent.pos + sent.k if unguessed else None
            up = sent.up + sum(b.up for b in cut)
            # The cut blocks' stale verdicts arrive later: their bytes ride on the next round.
            down, late_down, stale_down = sent.down + stale_down, stale_down, sum(b.down for b in cut)
            t_round = now - last
            e_compute, e_radio, e_j = m.energy(t_round, busy, up, down)
            self.totals.busy_s += busy
            cost = policy.controller.cost.model()
            d, gate = sent.decision, sent.gate
            tele = Telemetry(
                round=r,
                k=sent.k,
                accepted=accepted,
                emitted=emitted,
                t_round_s=t_round,
                t_draft_s=sent.draft_s,
                t_drafting_s=busy,  # every block drafted since the last verdict, as the real loop records
                t_net_s=max(0.0, sent.verdict_at - sent.sent_at - sent.edge_s),
                t_edge_queue_s=0.0,
                t_edge_compute_s=sent.edge_s,
                e_compute_j=e_compute,
                e_radio_j=e_radio,
                e_radio_link_j=m.link_j((t_round,), up, down),  # verdict to verdict, as the real loop
                e_j=e_j,
                bytes_up=up,
                bytes_down=down,
                energy_source="simulated",
                energy_kind="estimated",
                k_ref=d.k_ref,
                k_max=sent.cap,
                stop_reason=_block_end(sent.reason, sent.cap, sent.wanted, gate is not None),
                entropies=sent.view.entropies,
                p_accept=tuple(gate.p_accept) if gate else (),
                predrafted=(successor.k + 1 if not successor.follow else 0) if successor is not None else dropped,
                predraft_hit=hit and successor is not None and not successor.follow,  # as the live loop
                bonus_guess_hit=sent.guess_hit,
                sent_ahead=sent.early,
                guessed=sent.ahead and not sent.follow,
                follow=sent.follow,
                stale_blocks=sum(not b.follow for b in cut),
                stale_empty=sum(b.follow for b in cut),
                stale_bytes_down=late_down,
                wasted_tokens=wasted,
                wasted_j=wasted * cost.t_draft_s * cost.p_draft_w,  # the real loop's estimate
            )
            t0 = time.perf_counter()
            q = policy.observe(tele)
            self.totals.controller_s += time.perf_counter() - t0
            tele = replace(tele, q_deficit_j=q)
            self._record(tele, q)
            pos, r, last, busy, dropped = pos + emitted, r + 1, now, 0.0, 0

    def _chain_block(
        self, trace: Trace, pos: int, limit: int, r: int, ahead: tuple[_Block, Decision] | None
    ) -> tuple[_Block, float]:
        """Draft a block whose first draft is at `pos`: an ordinary one (`ahead` None: decided
        here) or one sent ahead after `ahead`'s block with its decision (`Drafter.draft_after`:
        the guess of the parent's target token at pos − 1, one forward more, then the drafts; a
        guess that is the drafter's eos gets none). Returns it and the controller's seconds."""
        policy = self.policy
        assert policy is not None
        t0 = time.perf_counter()
        decision = policy.decide(limit) if ahead is None else ahead[1]
        gate = policy.gate(decision)
        ctrl = time.perf_counter() - t0
        wanted = decision.k_max if gate else decision.k_ref
        cap = max(0, min(wanted, limit))
        if ahead is not None and pos - 1 in trace.eos_at:
            k, reason, gate_s = 0, "eos", 0.0
        else:
            k, reason, gate_s = _draft(trace, pos, cap, gate)
        view = DraftBlock(r, (0,) * k, entropies=trace.entropy[pos : pos + k])
        due, self._guess_due = self._guess_due, None
        guess_hit = None
        if ahead is None:
            guess_ok = verified = True
            draft_s = self.model.draft_s(k)
            if due is not None and k > 0:  # its first forward checks the guess nothing made
                guess_hit = self._guess_ok(trace, due)
        else:
            parent = ahead[0]
            parent.drafted_after = True
            guess_ok = self._guess_ok(trace, pos - 1)
            verified = parent.verified and min(trace.run[parent.pos], parent.k) == parent.k and guess_ok
            draft_s = self.model.draft_s(k + 1)  # the guess is one forward more
        block = _Block(
            pos, k, reason, decision, gate, cap, wanted, draft_s, ahead is not None, guess_ok, verified, view,
            guess_hit=guess_hit,
        )  # fmt: skip
        return block, ctrl + gate_s

    @staticmethod
    def _cuts(trace: Trace, chain: deque[_Block], block: _Block) -> bool:
        """`gelato.device.pipeline._CutRule`: the awaited verdict cuts the chain (fewer drafts
        accepted than sent, or the next block's guess missed: the one in flight, or `block`'s
        own when it follows the awaited one); known when that verdict arrives."""
        oldest = chain[0]
        partial = min(trace.run[oldest.pos], oldest.k) < oldest.k
        return partial or not _chain_hit(trace, oldest, chain[1] if len(chain) > 1 else block)

    def _cut_short(self, block: _Block, within_s: float) -> _Block:
        """The block as the live loop drafts it when its chain is cut `within_s` into its drafting:
        the cut is seen after the guess (`_CutRule.guessed`) and after each draft, so drafting
        ends with the first forward that ends after the verdict came (a verdict that came during
        the guess leaves no drafts); a block of no drafts is not cut."""
        if block.k == 0:
            return block
        forwards = 1  # the guess
        while forwards < block.k + 1 and self.model.draft_s(forwards) < within_s:
            forwards += 1
        if forwards == block.k + 1:
            return block
        k = forwards - 1
        view = replace(block.view, ids=block.view.ids[:k], entropies=block.view.entropies[:k])
        return replace(block, k=k, reason="cut", draft_s=self.model.draft_s(forwards), view=view)

    @staticmethod
    def _follow(pos: int, r: int, parent: _Block, decision: Decision, wanted: int) -> _Block:
        """An empty block sent ahead (`DraftBlock.follow`): no drafting, no guess, verified
        whenever its parent is (it asks for the token after whatever the parent gives)."""
        view = DraftBlock(r, ())
        return _Block(pos, 0, "", decision, None, 0, wanted, 0.0, True, True, parent.verified, view, follow=True)

    def _send(self, block: _Block, now: float, wire: _Wire) -> None:
        """Put `block` on the stream at `now`: when the edge has it, verifies it (or answers stale:
        its parent missed) and when its verdict is back, in stream order."""
        m = self.model
        block.sent_at = now
        block.early = block.ahead and wire.verdict_last > now  # the last verdict on the stream is its parent's
        block.up, block.down = m.wire(block.k + (block.ahead and not block.follow))  # a guess rides along
        one_up, one_down = m.delays(block.up, block.down, self.jitter_rng)
        wire.up_last = max(wire.up_last, now + one_up)
        start = max(wire.up_last, wire.edge_free)
        block.edge_s = m.edge_s(block.k) if block.verified else 0.0
        wire.edge_free = start + block.edge_s
        wire.verdict_last = block.verdict_at = max(wire.verdict_last, wire.edge_free + one_down)
