"""One token sequence with a persistent KV cache: the unit both the drafter and the target run.

Contract: `KVSequence` owns the token list and a `DynamicCache` holding KV for `tokens[:cached]`.
`forward(new_ids)` appends ids, runs the model over every token not yet cached and returns the
logits of those positions, sliced to the tokenizer's length; `forward_last(new_ids)`
returns the same logits' last row with less work around the model (the drafting hot path: one
token per forward). `truncate(n)` drops tokens and KV past position n, so after a verdict both
sides keep exactly the accepted prefix: no side recomputes the prefix. Not thread-safe: one owner
thread at a time.

`cache_kwarg(model)` names the keyword the model's forward takes its cache under: `cache` where the
installed transformers renamed it (it deprecates `past_key_values` and warns on every call), else
`past_key_values` (transformers 5.x before the rename, e.g. 5.17 and 5.18). Every forward that
passes a cache (here, `gelato.edge.kv_pool`, the benchmarks) uses it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

_CACHE_KWARG: dict[type, str] = {}
_KEEPS_LOGITS: dict[type, bool] = {}


def cache_kwarg(model: Any) -> str:
    """The keyword `model`'s forward takes its KV cache under, read once per model class from the
    forward's signature (which follows the decorators' `__wrapped__`): passing `cache` to a forward
    that does not name it would disappear into its `**kwargs` and silently run without the cache."""
    cls = type(model)
    name = _CACHE_KWARG.get(cls)
    if name is None:
        params = inspect.signature(cls.forward).parameters
        name = _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return name


def keeps_logits(model: Any) -> bool:
    """Whether `model`'s forward takes `logits_to_keep` (transformers' causal LMs do), read once
    per model class from its signature."""
    cls = type(model)
    keeps = _KEEPS_LOGITS.get(cls)
    if keeps is None:
        keeps = _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return keeps


class KVSequence:
    def __init__(self, model: Any, vocab_size: int, tokens: list[int] | None = None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.tokens: list[int] = list(tokens or [])
        # Full layers, whatever the config says: transformers' sliding-window layers keep only the
        # window and cannot be cropped back once it is reached, and a rejection must roll back.
        # The model still applies its sliding mask (it comes from the config, not from the cache).
        self.cache = DynamicCache()
        self.cache_kwarg = cache_kwarg(model)
        self.keep_last = keeps_logits(model)

    @property
    def cached(self) -> int:
        """Tokens whose KV is in the cache (always a prefix of `tokens`)."""
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, new_ids: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """Append `new_ids`, feed all uncached tokens, return their logits [n, vocab] (float32)."""
        self.tokens.extend(new_ids)
        pending = self.tokens[self.cached :]
        if not pending:
            raise ValueError("nothing to feed: every token is already cached")
        ids = torch.tensor([pending], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **{self.cache_kwarg: self.cache})
        return out.logits[0, :, : self.vocab_size].float()

    def forward_last(self, new_ids: list[int] | tuple[int, ...] = (), feed: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(new_ids)[-1]`, bit for bit, with less work around the model: the last
        position's logits only [vocab] (float32), the input tensor built only when needed, and the
        caller's inference-mode scope used when there is one (a drafted block runs under one).
        `feed`: a `[1, 1]` long tensor on the model's device that holds exactly the one token left
        to feed (the previous draft's argmax, still on the device); ignored when more than one
        token is uncached. With one token fed the model is asked for its last row
        (`logits_to_keep=1`), the same single row it computes anyway; with more, every row is
        computed as in `forward` (asking for the last row alone would round it differently) and
        the last one kept."""
        if type(self).forward is not KVSequence.forward:  # a subclass keeps its KV elsewhere
            return self.forward(new_ids)[-1]
        tokens = self.tokens
        tokens.extend(new_ids)
        cached = self.cached
        n = len(tokens) - cached
        if n <= 0:
            raise ValueError("nothing to feed: every token is already cached")
        kwargs: dict[str, Any] = {"use_cache": True, self.cache_kwarg: self.cache}
        if n == 1:
            if feed is None:
                feed = torch.tensor([tokens[cached:]], dtype=torch.long, device=self.device)
            if self.keep_last:
                kwargs["logits_to_keep"] = 1
        else:
            feed = torch.tensor([tokens[cached:]], dtype=torch.long, device=self.device)
        if torch.is_inference_mode_enabled():
            logits = self.model(input_ids=feed, **kwargs).logits[0, -1]
        else:
            with torch.inference_mode():
                logits = self.model(input_ids=feed, **kwargs).logits[0, -1]
        if logits.shape[-1] != self.vocab_size:
            logits = logits[: self.vocab_size]
        return logits if logits.dtype == torch.float32 else logits.float()

    def prefill(self, upto: int) -> None:
        """Cache KV for tokens[:upto] without keeping logits (used at session open)."""
        if upto <= self.cached:
            return
        with torch.inference_mode():
            ids = torch.tensor([self.tokens[self.cached : upto]], dtype=torch.long, device=self.device)
            keep = {"logits_to_keep": 1} if self.keep_last else {}  # a model that takes no such argument
            self.model(input_ids=ids, use_cache=True, **keep, **{self.cache_kwarg: self.cache})

    def truncate(self, length: int) -> None:
        """Keep tokens[:length]; drop KV past it (KV never extends beyond the kept tokens)."""
        del self.tokens[length:]
        if self.cached > length:
            self.cache.crop(length - self.cached)

    def set_tail(self, base: int, ids: list[int]) -> None:
        """Make the sequence tokens[:base] + ids, keeping KV for the part that did not change
        (after a verdict: the accepted drafts) and dropping the rest."""
        old = self.tokens[base:]
        same = 0
        while same < min(len(old), len(ids)) and old[same] == ids[same]:
            same += 1
        self.truncate(base + same)
        self.tokens.extend(ids[same:])

    def set_verdict(self, base: int, accepted: list[int] | tuple[int, ...], next_token: int) -> None:
        """After a verdict: tokens[:base] + accepted + [next_token], KV kept for the accepted part
        only, so the next token is left for the next forward to feed, as every round expects. Not
        `set_tail` with the next token: where a draft fed at its position was the same token (a
        sampled correction can equal the rejected draft when the residual falls back to p), that
        would keep its KV too, and the next forward would find nothing to feed or read its logits
        one row off."""
        self.set_tail(base, list(accepted))
        self.tokens.append(next_token)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This sequence's cached keys and values of one layer, `[1, kv_heads, cached, head_dim]`."""
        kv: Any = self.cache.layers[layer]
        return kv.keys, kv.values

    def kv_bytes(self) -> int:
        """Memory held by this sequence's KV cache."""
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


ROLLBACK_KINDS = frozenset({"full_attention", "sliding_attention"})


def check_rollback(model: Any, vocab_size: int) -> None:
    """Raise ValueError unless a `KVSequence` on `model` can roll back: its layers all attention
    (per `config.layer_types`, where the config has them), and a prefill, a crop and a forward past
    it running (a recurrent layer, linear attention or Mamba, keeps a state `crop` cannot rewind:
    transformers' cache then fails at the first forward with an IndexError, which a drafter
    would raise mid-generation)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - ROLLBACK_KINDS)
    if unknown:
        raise ValueError(f"layers of kind {', '.join(unknown)}: only attention layers' KV can be rolled back")
    probe = KVSequence(model, vocab_size, [i % vocab_size for i in range(3)])
    try:
        probe.prefill(3)
        probe.truncate(2)
        probe.forward([2 % vocab_size])
    except Exception as exc:  # a model whose cache is not plain attention KV
        raise ValueError(f"its cache cannot be rolled back ({type(exc).__name__}: {exc})") from None
