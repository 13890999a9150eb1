"""Sampling math for lossless speculative decoding. Pure tensor code, no I/O.

Glossary
- p: the target's processed distribution (temperature, top-k, top-p applied) at a draft position.
- q: the exact distribution the drafter sampled a token from (after the same processing plus top-m
  truncation and float16 quantisation); travels sparse as (ids, probs).
- k: drafted tokens in a block; a: how many leading drafts were accepted.
- residual: normalize(max(0, p - q)), sampled at the first rejection.
- bonus: a token sampled from p_{k+1} when all k drafts were accepted.

Greedy verification accepts x_i iff x_i == argmax p_i and emits argmax p_a. Sampling verification
accepts x_i with probability min(1, p_i(x_i) / q_i(x_i)); the emitted sequence is then distributed
exactly as the target's, for any q, provided q is what x_i was drawn from. Ratios are float32.

Randomness: `KeyedRng` draws by key (seed, role, token position, purpose; the drafter adds the
prefix it drafts after) instead of from a stream's state, so a generation re-opened on another
edge with its accepted prefix (failover) draws exactly what the uninterrupted one would have: same
seed, same tokens. Each uniform is 53 bits of the key's SHA-256 (not a generator's 32-bit seed,
under which distinct keys shared streams), and tokens are drawn by inverting the CDF at it, on
the CPU whatever device p sits on. Why a redraft needs its own key: speculative sampling is exact
when each draft is drawn independently of everything that decided to draft it. A draft that was cut (its block
rejected earlier, or sent ahead behind a miss) was not unseen: it set where its block stopped and
so, through the controller's estimates, what is drafted next. Re-drawn at the same position with
the same uniform, it would be correlated with that decision. The edge's acceptance uniform for a
position is used once (a tested draft is either accepted or replaced, never tested again), so the
position is key enough there; the drafter keys by position and prefix (a redraft follows a
different prefix: the token that replaced the cut one). The same key comes twice only for a
pre-draft dropped unused and drafted again after the very same tokens: it draws the same token
again, a draw that had set nothing but where that pre-draft stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from gelato.types import SamplingParams, SparseDist

# Below this total mass the residual is numerically empty (p ~= q); sampling from p is then exact
# because rejection had (numerically) zero probability.
RESIDUAL_EPS = 1e-12
# How many of the most probable tokens `top_p_filter` looks among for the nucleus before it sorts
# the whole row: they set the cost, not the result (`gelato.benchmarks.top_p` measures both).
_TOP_P_WINDOWS = (64, 1024)


class KeyedRng:
    """Uniforms keyed by (position, purpose[, prefix]): `uniform` is a pure function of the key."""

    def __init__(self, seed: int, role: str) -> None:
        self.seed, self.role = seed, role

    def uniform(self, position: int, purpose: str = "", prefix: Sequence[int] = ()) -> float:
        """A uniform in [0, 1) with 53 random bits from SHA-256 of the key; `prefix`: the tokens
        before `position` (the drafter's key), hashed as little-endian int32."""
        h = hashlib.sha256(f"{self.seed}:{self.role}:{purpose}:{position}:".encode())
        if prefix:
            h.update(np.asarray(prefix, dtype="<i4").tobytes())
        return (int.from_bytes(h.digest()[:8], "little") >> 11) * 2.0**-53


def generation_seed(seed: int, prompt_ids: Sequence[int], repeat: int = 0) -> int:
    """The seed a device sends the edge for one generation: the user's seed and the prompt, hashed
    (a uint64). The edge keys its draws by position alone: sent the user's seed as such, every
    prompt of a run would get the same acceptance and emit uniforms at each position, and a policy
    carrying what one prompt's verdicts showed into the next would decide where to draft by draws
    it had seen (speculative sampling needs each draw independent of that decision). `repeat`: how
    many generations of the same prompt the run made before this one, so that asking again draws
    afresh, for the same reason (and a second sample is not the first again). Keyed by the prompt,
    not by the prefix a failover re-opens with, so a failover draws what the uninterrupted
    generation would have."""
    h = hashlib.sha256(f"{seed}:generation:".encode())
    h.update(np.asarray(prompt_ids, dtype="<i4").tobytes())
    if repeat:  # the first generation of a prompt keeps the seed it always had
        h.update(f":repeat {repeat}".encode())
    return int.from_bytes(h.digest()[:8], "little")


# A source of randomness for one draw: a generator's stream, or one uniform in [0, 1) (keyed).
Draw = torch.Generator | float


def draw_index(weights: torch.Tensor, rng: Draw) -> int:
    """One index of `weights` (1-D, >= 0, not all 0), with probability proportional to its weight:
    `torch.multinomial` from a generator, or the inverse CDF (float64, on the CPU) at a uniform."""
    if isinstance(rng, torch.Generator):
        return int(torch.multinomial(weights.float(), 1, generator=rng).item())
    cdf = torch.cumsum(weights.detach().to("cpu", torch.float64), dim=0)
    # The first index whose cumulative weight exceeds u * total: never a zero-weight index, since
    # its cumulative weight equals the one before it.
    i = int(torch.searchsorted(cdf, rng * float(cdf[-1]), right=True))
    return i if i < len(cdf) else int(torch.nonzero(weights).max())  # defensive: u < 1 keeps u * total below it


def finite_logits(logits: torch.Tensor) -> torch.Tensor | None:
    """A 1-D row of logits a distribution can be made of, where some entry is not finite (a float16
    overflow to +inf, a NaN), which makes every probability NaN: the +inf entries become the row's
    likeliest, tied (the limit of the softmax), and NaN entries impossible. None when no entry is
    left (all NaN or -inf). The drafter's own choice of q: anything it samples from, sent as it is,
    keeps verification exact."""
    x = logits.float()
    top = x == float("inf")
    if bool(top.any()):
        return torch.zeros_like(x).masked_fill_(~top, float("-inf"))
    x = torch.nan_to_num(x, nan=float("-inf"), neginf=float("-inf"))
    return x if bool(torch.isfinite(x.max())) else None


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, over the last dim, in float32."""
    if params.greedy:
        raise ValueError("process_logits needs temperature > 0; greedy uses argmax")
    x = logits.float()
    # Shift first, then divide: every row's largest value becomes exactly 0 and the rest finite
    # or -inf, so a small temperature cannot overflow to inf - inf = NaN (softmax is shift-invariant).
    scaled = (x - x.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if 0.0 < params.top_p < 1.0:
        probs = top_p_filter(probs, params.top_p)
    return probs


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering over the last dim, renormalised: in descending order, keep the smallest
    prefix whose mass reaches `top_p` (the crossing token included), and every token tied with the
    crossing one (so the result depends on the probabilities alone, not on how a kernel orders ties).

    Exact without sorting the whole vocabulary where it can: the nucleus lies within the `c` most
    probable tokens as soon as the `c`-th of them is past the crossing, so `topk` over the first
    `_TOP_P_WINDOWS` finds it, row by row; only a row whose nucleus is larger still (a flat
    distribution) is sorted. A top-64 costs a small fraction of a sort of a 152k-entry row. Prefix
    masses are summed in float64: a window's equal the whole row's on a CPU (summed in order), so a
    row's result depends neither on the window nor, through it, on the other rows of the batch."""
    width = probs.shape[-1]
    flat = probs.reshape(-1, width)
    crossing = torch.empty(flat.shape[0], 1, dtype=probs.dtype, device=probs.device)
    rows = torch.arange(flat.shape[0], device=probs.device)  # rows whose nucleus is not found yet
    windows = [w for w in _TOP_P_WINDOWS if w < width]
    while True:
        window = windows.pop(0) if windows else width
        if window < width:
            top = torch.topk(flat[rows], window, dim=-1).values  # descending
        else:
            top = torch.sort(flat[rows], dim=-1, descending=True).values
        top64 = top.double()
        mass = top64.cumsum(dim=-1)
        kept = (mass - top64 < top_p).sum(dim=-1, keepdim=True)  # >= 1: nothing is ahead of the first
        found = (kept < window).squeeze(-1) if window < width else torch.ones_like(rows, dtype=torch.bool)
        crossing[rows[found]] = top[found].gather(-1, kept[found] - 1)
        if bool(found.all()):
            break
        rows, top, mass = rows[~found], top[~found], mass[~found]
        # The mass still missing comes in tokens no more probable than the window's last: at least
        # this many more. Windows that cannot hold them are skipped (a flat row goes to the sort).
        short = (top_p - mass[:, -1]) / top[:, -1].double().clamp_min(1e-300)
        needed = window + float(short.max())
        windows = [w for w in windows if w >= needed]
    crossing = crossing.reshape(*probs.shape[:-1], 1)
    probs = probs.masked_fill(probs < crossing, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def truncate_top_m(probs: torch.Tensor, top_m: int) -> SparseDist:
    """The drafter's sampling distribution for one position: the top-m support of `probs`
    (1-D), renormalised and rounded to float16. The device samples from exactly these values."""
    m = min(top_m, int((probs > 0).sum().item()))
    vals, ids = torch.topk(probs, m)
    vals16 = (vals / vals.sum()).to(torch.float16)
    keep = vals16 > 0
    return SparseDist(ids=tuple(ids[keep].tolist()), probs=tuple(vals16[keep].float().tolist()))


def sample_sparse(q: SparseDist, rng: Draw) -> int:
    """Draw one token from a sparse distribution."""
    return q.ids[draw_index(torch.tensor(q.probs, dtype=torch.float32), rng)]


def sample_dense(probs: torch.Tensor, rng: Draw) -> int:
    return draw_index(probs, rng)


def dense_q(q: SparseDist, vocab_size: int) -> torch.Tensor:
    """A sparse q as a dense float32 vector over the vocabulary."""
    out = torch.zeros(vocab_size, dtype=torch.float32)
    probs = torch.tensor(q.probs, dtype=torch.float32)
    out[torch.tensor(q.ids, dtype=torch.long)] = probs / probs.sum()
    return out


def residual_distribution(p_row: torch.Tensor, q: SparseDist) -> torch.Tensor:
    """normalize(max(0, p - q)); p itself when the residual is numerically empty (then p == q up to
    rounding, a rejection had ~zero probability, and p is the exact answer)."""
    residual = torch.clamp(p_row - dense_q(q, p_row.shape[-1]), min=0.0)
    mass = float(residual.sum())
    return residual / mass if mass > RESIDUAL_EPS else p_row


def verify_greedy(target_logits: torch.Tensor, draft_ids: tuple[int, ...]) -> tuple[int, int]:
    """Greedy verification. target_logits: [k+1, V] (row i predicts draft i). Returns (a, next)."""
    return accept_greedy(target_logits.argmax(dim=-1).tolist(), draft_ids)


def accept_greedy(best: Sequence[int], draft_ids: Sequence[int]) -> tuple[int, int]:
    """Greedy verification on the target's argmaxes (`best[i]` predicts draft i, k+1 of them):
    the leading drafts equal to them are accepted, then the target's own token. Returns (a, next)."""
    a = 0
    while a < len(draft_ids) and draft_ids[a] == best[a]:
        a += 1
    return a, int(best[a])


def verify_sampling(
    p: torch.Tensor,
    draft_ids: tuple[int, ...],
    q: tuple[SparseDist, ...],
    generator: torch.Generator | KeyedRng,
    base: int = 0,
) -> tuple[int, int]:
    """Speculative sampling. p: [k+1, V] processed target probabilities, on any device (the
    draws run on the CPU: p's draft entries come over in one transfer, then the one row drawn
    from). Returns (a, next). With a `KeyedRng`, draft i's uniform and the emitted token's draw
    are keyed by their position `base + i` in the generation; with a plain generator they come
    from its stream (CPU). Raises ValueError on a p that is not a distribution (NaN, inf or
    negative entries): sampling from it would be meaningless, and torch's own error would not say
    where it came from."""
    k = len(draft_ids)
    if len(q) != k:
        raise ValueError(f"need one q per draft token: {len(q)} q for {k} ids")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("target probabilities p contain NaN, inf or negative values: not a distribution")
    if isinstance(generator, KeyedRng):
        uniforms = [generator.uniform(base + i, "accept") for i in range(k)]
    else:
        uniforms = torch.rand(k, generator=generator).tolist() if k else []

    def emit(i: int) -> Draw:
        return generator.uniform(base + i, "emit") if isinstance(generator, KeyedRng) else generator

    p_drafts: list[float] = []
    sums: list[float] = []
    if k:  # p's draft entries and row sums in one transfer (one sync when p sits on an accelerator)
        ids = torch.tensor(draft_ids, dtype=torch.long, device=p.device)
        picked = p[torch.arange(k, device=p.device), ids].float()
        # Summed in float32 where p lies (MPS has no float64): torch's reduction is accurate to
        # ~1e-7 of the sum, far below the softmax's own ~3e-5.
        both = torch.cat([picked, p[:k].float().sum(dim=-1)]).tolist()
        p_drafts, sums = both[:k], both[k:]
        if min(sums) <= 0:
            raise ValueError("target probabilities p have a row of zeros: not a distribution")
    for i, (x, qi) in enumerate(zip(draft_ids, q, strict=True)):
        q_x = qi.prob_of(x)
        # u < p/q without dividing, p read relative to its row's sum: a float32 softmax over a
        # 152k vocabulary sums to 1 only within ~3e-5, and the accept test would carry that bias
        # (the residual and the emitted draws are normalised anyway).
        if q_x > 0 and uniforms[i] * q_x * sums[i] < p_drafts[i]:
            continue
        return i, sample_dense(residual_distribution(p[i].cpu() / sums[i], qi), emit(i))
    return k, sample_dense(p[k].cpu(), emit(k))
