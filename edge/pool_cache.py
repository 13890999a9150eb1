"""What a target forward sees of the KV pool (`gelato.edge.kv_pool`), and which targets it serves.

Contract: `PoolCache` / `SplitPoolCache` are the cache argument `KVPool.forward` hands the model
(`update`, `get_seq_length` and the two sizes transformers asks for when no mask is passed);
`mask_free_ok(config)` says when a forward may pass no mask; `attention_window(config)` and
`pool_model(loaded)` decide whether and up to which context the pool serves a target losslessly.
No allocation here: the pool owns the tensors, these objects only index them.

How a forward works: a duck-typed cache whose `update(k, v, layer)` scatters the new keys and
values to `(slot_i, cached_i + j)` and returns this batch's pool rows `[:, :, :L]`. Rows are
left-aligned (each starts at offset 0), so the causal structure differs per row and is passed as a
float additive 4D mask (query j of row i sees keys `0..cached_i + j`), with explicit per-row
positions. The batch needs context up to the furthest row end `max(cached_i + n_i)`.
Padding queries of short rows are clamped onto their row's last position and write no KV (only
real (row, position) pairs are written; rows of equal length keep the plain strided write, and a
lone row writes one slice), so a row's padding can neither pass the context limit nor touch KV;
their outputs are discarded. Bookkeeping outside the model is kept small (it is paid on every
round): lengths stay Python ints, ids and positions reach torch in one call, slot index tensors
are reused per slot set, and one query per row at equal ends (every query sees every key) passes
no mask at all with SDPA (`mask_free_ok`), an all-zero one otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from gelato.models import LoadedModel, ModelLoadError

if TYPE_CHECKING:
    from gelato.edge.kv_pool import KVPool

log = logging.getLogger("gelato.edge")


class PoolCache:
    """What a Qwen2 forward needs from its cache argument: `update` and `get_seq_length`.

    `valid` ([B, n] bool, None when every row is full) marks the real queries; only their KV is
    written. A padding query sits on its row's last real position (clamped), so writing it would
    overwrite that position's real KV with padding's. `single` = (slot, start, n) for one full
    row (a lone session): its KV is written as a slice, no index tensors at all."""

    def __init__(
        self,
        pool: KVPool,
        slots: list[int],
        index: torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
        valid: torch.Tensor | None,
        single: tuple[int, int, int] | None,
    ) -> None:
        self.pool, self.positions, self.kv_len = pool, positions, kv_len
        self.slots = index
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        self.window = slice(slots[0], slots[0] + len(slots)) if consecutive else None
        self.valid, self.single = valid, single
        if valid is not None:  # the real (slot, position) pairs, flattened once for every layer
            self.flat_slots = self.slots[:, None].expand_as(positions)[valid]
            self.flat_positions = positions[valid]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args: Any, **kw: Any) -> tuple:
        pk, pv = self.pool.keys[layer], self.pool.values[layer]
        if self.single is not None:  # [1, heads, n, d] into the slot's positions start..start+n-1
            slot, start, n = self.single
            pk[slot, :, start : start + n] = keys[0]
            pv[slot, :, start : start + n] = values[0]
        elif self.valid is None:
            # [B, heads, n, d] -> [B, n, heads, d]: advanced indices on dims 0 and 2 go to the front.
            rows = self.slots[:, None]
            pk[rows, :, self.positions] = keys.transpose(1, 2)
            pv[rows, :, self.positions] = values.transpose(1, 2)
        else:
            pk[self.flat_slots, :, self.flat_positions] = keys.transpose(1, 2)[self.valid]
            pv[self.flat_slots, :, self.flat_positions] = values.transpose(1, 2)[self.valid]
        if self.window is not None:  # a view: no copy of the past at all
            return pk[self.window, :, : self.kv_len], pv[self.window, :, : self.kv_len]
        return pk[self.slots, :, : self.kv_len], pv[self.slots, :, : self.kv_len]

    def get_seq_length(self, layer: int = 0) -> int:
        return 0  # positions are always passed explicitly

    # Asked by transformers only when no mask is passed (`KVPool.forward` passes none only for
    # one query per row at equal ends): that query is the last position and sees every key.
    def get_query_offset(self, layer: int = 0) -> int:
        return self.kv_len - 1

    def get_mask_sizes(self, query: Any, layer: int = 0) -> tuple[int, int]:
        return self.kv_len, 0


class SplitPoolCache:
    """Layers on several devices: one `PoolCache` per device; layer `i` goes to `parts[group[i]]`."""

    def __init__(self, parts: list[PoolCache], group: list[int]) -> None:
        self.parts, self.group = parts, group

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args: Any, **kw: Any) -> tuple:
        return self.parts[self.group[layer]].update(keys, values, layer, *args, **kw)

    def get_seq_length(self, layer: int = 0) -> int:
        return 0

    def get_query_offset(self, layer: int = 0) -> int:
        return self.parts[0].get_query_offset(layer)

    def get_mask_sizes(self, query: Any, layer: int = 0) -> tuple[int, int]:
        return self.parts[0].get_mask_sizes(query, layer)


def mask_free_ok(config: Any) -> bool:
    """Whether a forward of one query per row that sees every key may pass no mask: with SDPA and
    only full-attention layers, transformers then passes none to the kernel. Other attention
    implementations build their own mask from the cache's sizes, which older transformers 5.x read
    from positions this pool does not give it, so they keep the explicit one."""
    layers = set(getattr(config, "layer_types", None) or ["full_attention"])
    return getattr(config, "_attn_implementation", None) == "sdpa" and layers == {"full_attention"}


def attention_window(config: Any) -> int | None:
    """The narrowest sliding attention window any layer of this config applies (None: every layer
    attends to the whole context). Raises ValueError for a layer kind the pool cannot serve."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"layers of kind {', '.join(unknown)}: the edge's KV pool serves attention layers only")
        return int(window) if "sliding_attention" in layer_types and window else None
    # No per-layer kinds (e.g. Mistral): the window applies to every layer when set (and allowed).
    if window and getattr(config, "use_sliding_window", True):
        return int(window)
    return None


def pool_model(loaded: LoadedModel, quiet: bool = False) -> LoadedModel:
    """The target as the KV pool can serve it losslessly. The pool passes its own causal mask,
    which a sliding-window layer then applies over the whole context: so the context limit is cut
    to the window, within which sliding and full attention are the same (a longer sequence is
    refused at open or ends OUT_OF_RANGE, never decoded differently from the target).
    `ModelLoadError` for layers the pool cannot serve (e.g. linear attention). `quiet`: no log
    line (a `TargetSession` built on a model the server did not load, e.g. a benchmark's
    reference, applies it too)."""
    try:
        window = attention_window(loaded.model.config)
    except ValueError as exc:
        raise ModelLoadError(f"target {loaded.name!r}: {exc}") from None
    if window is None or window >= loaded.context_limit:
        return loaded
    if not quiet:
        limit = loaded.context_limit
        log.warning("target %s: sliding-window attention: context limit cut from %d to %d", loaded.name, limit, window)
    return replace(loaded, context_limit=window)
