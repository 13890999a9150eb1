"""Slot-based target KV pool: every session's KV in one tensor per layer, batched in place.

Contract: a `KVPool` holds, per layer, keys and values `[slots, kv_heads, context, head_dim]`. A
`PooledSequence` (same interface as `gelato.kv.KVSequence`: tokens, cached, forward, prefill,
truncate, set_tail, kv_bytes) owns one slot; its KV for positions `0..n-1` lives at offsets
`0..n-1` of that slot. `pooled_forward(rows)` runs ONE target forward over `(sequence, new_ids)`
rows of any lengths, writes each row's new KV into its slot at its own offsets and returns each
row's logits `[n_i, vocab]` (float32). Rolling back remembers a shorter length (the KV past it is
masked in a batch with longer rows, overwritten later, and zeroed in float16, where an overflow
there would defeat the mask); `rewind(length, cached)` puts a sequence back as it was read before a
forward. Everything runs on the model thread, releases included (the server submits them there),
so a slot is never handed to a new session while a forward that still includes its old owner is
pending.

Why a pool rather than stacking per-session `DynamicCache`s (`benchmarks/kv_layouts.py`, results in
`benchmarks/results/kv_layouts_cpu.md`): stacking copies every row's past KV per layer twice, so
its cost grows with the rows well past a raw forward's; the pool writes only the new tokens and
costs about a raw forward. The price is memory: every slot is as long as the pool's context.

Sizing: whoever admits sessions (`gelato.edge.sessions.SessionRegistry`) decides the pool's shape with the
pure `gelato.edge.sessions.plan_pool` — slots for every open session, context for the longest reservation, with
hysteresis so a session coming or going rarely reshapes it — and never lets `slots × context` pass
the KV budget; `set_target` hands that shape over and the model thread applies it before its next
allocation or forward, moving live rows down into low slots when the pool shrinks. So
`--kv-budget-mb` bounds the memory the pool really holds, and an idle edge holds none. A reshape
is all or nothing: without device memory for it (`PoolMemoryError`) the pool keeps its shape (or,
if undoing a failed shrink finds no memory either, the part both shapes hold, as views), so the
forward's rows go on; the target stays pending, tried again only by a row that needs its room (a
new slot, a longer context), which then takes just that room (one more slot, its own length) if
the target's headroom cannot be had, and alone fails if even that cannot: never a doubling past
it. A pool without a target (tests, benchmarks, a lone `TargetSession`) grows by doubling on
demand instead. Freed slots are reused lowest-first so busy batches stay consecutive.

Placement: each layer's KV lives where the layer executes (`KVPool(..., devices=)`, by default
`gelato.edge.placement.model_kv_devices`): one device for an ordinary model; for a target placed by
accelerate (`gelato-edge --device-map`) the layer's own device, or for one offloaded to CPU memory
or disk the main device it runs on (`layer_devices`). Ids, positions and the mask are built on the
input embedding's device (`KVPool.device`), index tensors are copied once per forward to each
further device, and the logits come back on `KVPool.device`. Reshapes move each layer's KV on its
device. With every layer on `KVPool.device` a forward takes the one-device path.

How the forward works: `gelato.edge.pool_cache` (the cache object a forward writes through,
and which targets the pool serves).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from gelato.edge.placement import DeviceLike, as_device, model_kv_devices
from gelato.edge.pool_cache import PoolCache, SplitPoolCache, mask_free_ok
from gelato.kv import KVSequence, cache_kwarg, keeps_logits
from gelato.models import input_device, out_of_memory

log = logging.getLogger("gelato.edge")


class PoolMemoryError(MemoryError):
    """The pool could not allocate the shape it needed; it keeps the one it had."""


class KVPool:
    """Every session's target KV, one tensor per layer on that layer's device (module docstring).
    `devices`: per layer, where it executes (default `model_kv_devices(model)`); the model must
    bring each layer's inputs to its device (accelerate's hooks do)."""

    def __init__(
        self,
        model: Any,
        vocab_size: int,
        slots: int = 4,
        context: int = 256,
        max_context: int = 0,
        devices: Sequence[DeviceLike] | None = None,
    ) -> None:
        cfg = model.config
        self.model, self.vocab_size = model, vocab_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Multi-head attention configs (GPT-2, OPT, GPT-NeoX) name no KV heads: one per query head.
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.device = input_device(model)  # ids, positions, mask and the logits returned
        self.max_context = max_context or int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        self.layers = cfg.num_hidden_layers
        self.layer_devices = [as_device(d) for d in devices] if devices is not None else model_kv_devices(model)
        if len(self.layer_devices) != self.layers:
            raise ValueError(f"{len(self.layer_devices)} KV devices given for {self.layers} layers")
        # Devices other than `self.device`, in layer order, and each layer's index among
        # [self.device, *those]: empty when every layer runs on `self.device` (the plain path).
        self._others = list(dict.fromkeys(d for d in self.layer_devices if d != self.device))
        self._group = [0 if d == self.device else 1 + self._others.index(d) for d in self.layer_devices]
        self.cache_kwarg = cache_kwarg(model)
        self.mask_free = mask_free_ok(cfg)
        self.keep_last = keeps_logits(model)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots, self.context = 0, 0
        self._held_bytes = 0  # what the layers' storage holds (more than the shape after `_narrow`)
        self._owners: dict[int, PooledSequence] = {}  # slot -> the sequence whose KV is there
        self._target: tuple[int, int] | None = None
        self._failed: tuple[int, int] | None = None  # a target the device had no memory for
        self._lock = threading.Lock()
        # Reused by every forward (model thread): slot index tensors per slot set, key offsets
        # 0..context-1, and the mask's two values.
        self._slot_index: dict[tuple[int, ...], torch.Tensor] = {}
        self._offsets = torch.arange(0, device=self.device)
        self._visible = torch.zeros((), dtype=self.dtype, device=self.device)
        self._hidden = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        self._resize(slots, min(context, self.max_context))

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def nbytes(self) -> int:
        """Memory the pool holds: all slots at the current context, or after a reshape whose
        undo found no memory (`_narrow`), the larger storage its layers still sit in."""
        return self._held_bytes

    def live(self) -> int:
        """Slots owned by a sequence."""
        return len(self._owners)

    @torch.inference_mode()
    def _resize(self, slots: int, context: int) -> None:
        """Reallocate to `[slots, heads, context, dim]`, keeping what fits (model thread; owned
        slots must lie below `slots` and their KV within `context`). All or nothing: if an
        allocation fails (`PoolMemoryError`), the layers already reallocated go back to the old
        shape with their KV, so the pool holds and reports what it did before."""
        keep_s, keep_c = min(slots, self.slots), min(context, self.context)
        shape = (slots, self.kv_heads, context, self.head_dim)
        done: list[tuple[list[torch.Tensor], int]] = []
        grown = [len(self.keys), len(self.values)]
        try:
            for store in (self.keys, self.values):
                for layer, device in enumerate(self.layer_devices):
                    new = self._alloc(shape, device)
                    if len(store) > layer:
                        new[:keep_s, :, :keep_c] = store[layer][:keep_s, :, :keep_c]
                        store[layer] = new  # one layer at a time: the old one is freed as we go
                        done.append((store, layer))
                    else:
                        store.append(new)
        except Exception as exc:
            restored = self._undo(done, keep_s, keep_c)
            del self.keys[grown[0] :], self.values[grown[1] :]
            if not restored:
                self._narrow(keep_s, keep_c)
            if not out_of_memory(exc):
                raise
            mib = slots * context * self.bytes_per_token() / 2**20
            # The allocator's own text (a CUDA one names other processes and their memory) stays
            # in the cause, for the edge's log, not the message a device is sent.
            wanted = f"{slots} slots x {context} tokens ({mib:.0f} MiB)"
            raise PoolMemoryError(f"the KV pool could not grow to {wanted}") from exc
        self.slots, self.context = slots, context
        self._held_bytes = slots * context * self.bytes_per_token()

    def _alloc(self, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        """One layer's keys or values, zeroed (every allocation of the pool's memory goes here)."""
        return torch.zeros(shape, dtype=self.dtype, device=device)

    def _undo(self, done: list[tuple[list[torch.Tensor], int]], keep_s: int, keep_c: int) -> bool:
        """Put the layers a failed `_resize` reallocated back to the current shape, KV kept (owned
        rows lie within `keep_s` x `keep_c`). False if even that shape found no memory (a shrink
        that failed needs the larger old shape back): some layers are left in the new shape."""
        shape = (self.slots, self.kv_heads, self.context, self.head_dim)
        for store, layer in done:
            try:
                old = self._alloc(shape, store[layer].device)
            except Exception:
                log.exception("the KV pool could not take back its %d x %d shape", self.slots, self.context)
                return False
            old[:keep_s, :, :keep_c] = store[layer][:keep_s, :, :keep_c]
            store[layer] = old
        return True

    def _narrow(self, keep_s: int, keep_c: int) -> None:
        """After an undo that found no memory, layers of two shapes: every layer becomes a view of
        the `keep_s` x `keep_c` part both shapes hold (every owned row's KV lies there), so the
        pool has one shape again without allocating; the next reshape reallocates. The storage
        behind the views stays held (and reported by `nbytes`) until then."""
        for store in (self.keys, self.values):
            for layer, kv in enumerate(store):
                store[layer] = kv[:keep_s, :, :keep_c]
        self.slots, self.context = keep_s, keep_c
        self._held_bytes = sum(t.untyped_storage().nbytes() for t in [*self.keys, *self.values])

    def set_target(self, slots: int, context: int) -> None:
        """The shape to take before the next allocation or forward (any thread)."""
        with self._lock:
            self._target = (slots, min(context, self.max_context))

    def apply_target(self, strict: bool = False) -> None:
        """Take the shape last set (model thread, before slots are read for a forward). If the
        device has no memory for it, the pool keeps its shape and the target stays pending: a
        forward goes on with the shape it has (its rows fit it) and does not try that target
        again; `strict` (a row that needs the room the target gives: `alloc`, `ensure_context`)
        tries it again and raises `PoolMemoryError`, so that row alone fails."""
        with self._lock:
            target = self._target
        if target is None or (target == self._failed and not strict):
            return
        # A release still on its way may keep a row alive a little longer: never drop live KV,
        # and keep the target pending until that row is gone too.
        slots = max(target[0], len(self._owners))
        context = max([target[1]] + [seq.cached for seq in self._owners.values()])
        if context > target[1]:
            # That row holds more context than the plan gives every slot: the plan's slots at its
            # context could be many times the budget. No more slots than now until it is gone.
            slots = max(len(self._owners), min(slots, self.slots))
        if (slots, context) != (self.slots, self.context):
            self._compact(slots)
            try:
                self._resize(slots, context)
            except PoolMemoryError as exc:
                if target != self._failed:
                    log.warning("%s; keeping %d slots x %d tokens", exc, self.slots, self.context)
                self._failed = target
                if strict:
                    raise
                return
        with self._lock:
            self._failed = None
            if self._target == target and (slots, context) == target:
                self._target = None

    @torch.inference_mode()
    def _compact(self, slots: int) -> None:
        """Move rows living at or above `slots` into free slots below it."""
        free = [s for s in range(slots) if s not in self._owners]
        for src in sorted(s for s in self._owners if s >= slots):
            dst = free.pop(0)
            for store in (self.keys, self.values):
                for layer in range(self.layers):
                    store[layer][dst] = store[layer][src]
            seq = self._owners.pop(src)
            seq.slot, self._owners[dst] = dst, seq

    def alloc(self, owner: PooledSequence) -> int:
        """The lowest free slot for `owner`, growing the pool if none is (model thread)."""
        self.apply_target()
        free = next((s for s in range(self.slots) if s not in self._owners), None)
        planned: PoolMemoryError | None = None
        if free is None and self._target is not None:
            # The registry planned room for this row and the pool could not take it yet: now or
            # never for this row (the budget's shape, not a doubling past it).
            try:
                self.apply_target(strict=True)
            except PoolMemoryError as exc:  # the plan's headroom does not fit: the row's own slot may
                planned = exc
            free = next((s for s in range(self.slots) if s not in self._owners), None)
        if free is None:
            # Planned, and the planned shape found no memory or rows whose release is still on its
            # way hold the slots: one more slot (the shape that held them all before fitted the
            # budget; a doubling went past it). A pool no registry shapes grows on demand.
            free = self.slots
            grown = len(self._owners) + 1 if self._target is not None else max(1, 2 * self.slots)
            self._resize_or_raise(grown, self.context, planned)
        else:
            self._wipe(free)
        self._owners[free] = owner
        return free

    @torch.inference_mode()
    def _wipe(self, slot: int, start: int = 0, end: int | None = None) -> None:
        """Zero a slot a former owner used (or, in float16, a row's own rolled-back `start:end`). A
        row shorter than its batch's longest attends over its slot's stale KV past its end, hidden
        by the mask's large negative, which hides finite values only: a NaN or inf left there (a
        float16 overflow) would poison the row's logits whenever it is batched with a longer row."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[slot, :, start:end].zero_()

    def release(self, slot: int) -> None:
        self._owners.pop(slot, None)

    def ensure_context(self, tokens: int) -> None:
        if tokens > self.max_context:
            raise ValueError(f"{tokens} tokens exceed the target's context limit of {self.max_context}")
        planned: PoolMemoryError | None = None
        if tokens > self.context and self._target is not None:
            try:
                self.apply_target(strict=True)  # the planned shape first, as `alloc` does
            except PoolMemoryError as exc:  # its headroom does not fit: the row's own length may
                planned = exc
        if tokens > self.context:
            # Doubling (O(log n) reallocations); past a plan (a row being released, or the plan
            # found no memory) its length only
            context = max(1, self.context) if self._target is None else tokens
            while context < tokens:
                context *= 2
            self._resize_or_raise(self.slots, min(context, self.max_context), planned)

    def _resize_or_raise(self, slots: int, context: int, planned: PoolMemoryError | None) -> None:
        """`_resize`, but where the planned shape failed already and this smaller one fails too,
        the error names the planned shape (what the registry admitted the row for)."""
        try:
            self._resize(slots, context)
        except PoolMemoryError:
            if planned is None:
                raise
            raise planned from planned.__cause__  # the allocator's text for the planned shape, for the log

    def _index(self, slots: list[int]) -> torch.Tensor:
        key = tuple(slots)
        index = self._slot_index.get(key)
        if index is None:
            if len(self._slot_index) >= 256:  # batches keep changing: start over
                self._slot_index.clear()
            index = self._slot_index[key] = torch.tensor(key, device=self.device)
        return index

    def _split(
        self, first: PoolCache, slots: list[int], positions: torch.Tensor, kv_len: int, valid: torch.Tensor | None
    ) -> SplitPoolCache:
        """`first` (this forward's cache on `self.device`) and one like it on each further device."""
        parts, single = [first], first.single
        for device in self._others:
            moved = valid.to(device) if valid is not None else None
            parts.append(PoolCache(self, slots, first.slots.to(device), positions.to(device), kv_len, moved, single))
        return SplitPoolCache(parts, self._group)

    @torch.inference_mode()
    def forward(self, rows: list[tuple[int, int, list[int]]], last_only: bool = False) -> list[torch.Tensor]:
        """One forward over `(slot, cached_len, new_ids)` rows; logits per row (or its last).
        The context needed is the furthest row END (cached_i + n_i), not longest cache + longest
        block: a row at the context limit batches with a row sending a long block. Lengths stay
        Python ints; the ids and positions go to torch in one call. `last_only` with rows of one
        length (a prefill): the model computes the last position's logits alone (a long prompt's
        [n, vocab] float32 logits would cost more memory than its KV), which may round that row
        differently from a full forward; prefills discard it."""
        lengths = [len(ids) for _, _, ids in rows]
        n_max, batch = max(lengths), len(rows)
        ends = [c + n for (_, c, _), n in zip(rows, lengths, strict=True)]
        kv_len = max(ends)
        self.ensure_context(kv_len)
        # Padding queries of short rows are clamped onto their row's last position: their rotary
        # position and mask stay inside the row (never past the context), they write no KV
        # (`PoolCache.valid`) and their logits are dropped below.
        flat: list[int] = []
        for _, _, ids in rows:
            flat += ids
            flat += [0] * (n_max - len(ids))
        for (_, c, _), n, end in zip(rows, lengths, ends, strict=True):
            flat += range(c, end)
            flat += [end - 1] * (n_max - n)
        both = torch.tensor(flat, dtype=torch.long).view(2, batch, n_max).to(self.device)
        input_ids, positions = both[0], both[1]
        valid = None
        if min(lengths) < n_max:
            valid = torch.tensor([[j < n for j in range(n_max)] for n in lengths], device=self.device)
        mask: torch.Tensor | None
        if n_max == 1 and min(ends) == kv_len:
            # One query per row, every row as long: each query sees every key, so SDPA needs no
            # mask at all (the kernel then skips masking); other kernels get an all-zero one.
            mask = None if self.mask_free else torch.zeros(batch, 1, 1, kv_len, dtype=self.dtype, device=self.device)
        else:  # query j of row i sees keys 0..positions[i, j]
            if self._offsets.numel() < kv_len:
                self._offsets = torch.arange(max(kv_len, self.context), device=self.device)
            visible = self._offsets[:kv_len] <= positions[:, None, :, None]
            mask = torch.where(visible, self._visible, self._hidden)
        slots = [s for s, _, _ in rows]
        single = (slots[0], rows[0][1], n_max) if batch == 1 else None
        first = PoolCache(self, slots, self._index(slots), positions, kv_len, valid, single)
        cache = self._split(first, slots, positions, kv_len, valid) if self._others else first
        kwargs: dict[str, Any] = {self.cache_kwarg: cache}
        keep_one = last_only and valid is None and self.keep_last
        if keep_one:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        logits = out.logits[:, :, : self.vocab_size].float()
        if self._others:  # accelerate brings them back already; any other split model may not
            logits = logits.to(self.device)
        if keep_one:
            return [logits[i, -1:] for i in range(batch)]
        if last_only:
            return [logits[i, n - 1 : n] for i, n in enumerate(lengths)]
        return [logits[i, :n] for i, n in enumerate(lengths)]


class PooledSequence(KVSequence):
    """A `KVSequence` whose KV lives in a slot of a shared `KVPool` (taken at its first forward)."""

    def __init__(self, pool: KVPool, tokens: list[int] | None = None) -> None:
        self.pool = pool
        self.model, self.vocab_size, self.device = pool.model, pool.vocab_size, pool.device
        self.tokens = list(tokens or [])
        self.slot: int | None = None
        self.closed = False
        self._cached = 0

    @property
    def cached(self) -> int:
        return self._cached

    def _slot(self) -> int:
        if self.closed:
            raise RuntimeError("this sequence was released: its KV slot belongs to the pool again")
        if self.slot is None:
            self.slot = self.pool.alloc(self)
        return self.slot

    def forward(self, new_ids: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        return pooled_forward([(self, tuple(new_ids))])[0]

    def reserve(self, tokens: int) -> None:
        """Take a slot and the context for `tokens` now (model thread): the room a session was
        admitted for, so that a pool the device has no memory for fails its open
        (`PoolMemoryError`), not a verify halfway through its generation."""
        self.pool.apply_target()
        self._slot()
        self.pool.ensure_context(tokens)

    def prefill(self, upto: int) -> None:
        if upto > self._cached:
            self.pool.apply_target()
            self._slot()
            self.pool.ensure_context(upto)  # before the slot is read: taking a pending shape may move rows
            self.pool.forward([(self._slot(), self._cached, self.tokens[self._cached : upto])], last_only=True)
            self._cached = upto

    def truncate(self, length: int) -> None:
        del self.tokens[length:]
        self._forget(length)

    def rewind(self, length: int, cached: int) -> None:
        """Back to a state read before a forward: `length` tokens, KV for `cached` of them (both at
        most what is there now; `tokens[:length]` unchanged since). Undoes the forward and any
        `set_tail` after it."""
        del self.tokens[length:]
        self._forget(cached)

    def _forget(self, cached: int) -> None:
        """KV kept for `cached` tokens; the stale rest is zeroed in float16 (`KVPool._wipe`)."""
        if cached < self._cached and self.slot is not None and self.pool.dtype == torch.float16:
            self.pool._wipe(self.slot, cached, self._cached)
        self._cached = min(self._cached, cached)

    def kv_bytes(self) -> int:
        return self._cached * self.pool.bytes_per_token()

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._slot()
        return (
            self.pool.keys[layer][s : s + 1, :, : self._cached],
            self.pool.values[layer][s : s + 1, :, : self._cached],
        )

    def release(self) -> None:
        """Give the slot back (idempotent); the sequence must not be used afterwards. Call it on
        the model thread, so no forward that still includes this sequence can run after it."""
        self.closed = True
        if self.slot is not None:
            self.pool.release(self.slot)
            self.slot = None


def pooled_forward(rows: list[tuple[PooledSequence, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Append each row's ids, run one forward over every row's uncached tokens (model thread).
    Rows go to the model in slot order, so any set of consecutive slots is read as a view. If it
    raises, every row's tokens are restored to what they were before the call."""
    pool = rows[0][0].pool
    if any(seq.pool is not pool for seq, _ in rows):
        raise ValueError("rows of one batched forward must share one KV pool")
    if len({id(seq) for seq, _ in rows}) != len(rows):
        raise ValueError("a sequence appears twice in one batched forward")
    pool.apply_target()  # before reading slots: applying it may move rows
    for seq, _ in rows:
        # Every row's slot before any is read: a row's first slot is taken here, and taking it
        # applies a reshape the event loop may have asked for meanwhile, which may move rows.
        seq._slot()
    before = [len(seq.tokens) for seq, _ in rows]
    try:
        for seq, ids in rows:
            seq.tokens.extend(ids)
            if len(seq.tokens) == seq.cached:
                raise ValueError("nothing to feed: every token is already cached")
        # The context before the slots are read: growing it may take a pending shape first, and
        # that may move rows to lower slots (a forward given their old slots would write there,
        # or past a pool that shrank: on a GPU a device-side assert that ends every session).
        pool.ensure_context(max(len(seq.tokens) for seq, _ in rows))
        batch = [(seq._slot(), seq.cached, seq.tokens[seq.cached :]) for seq, _ in rows]
        order = sorted(range(len(batch)), key=lambda i: batch[i][0])
        logits = pool.forward([batch[i] for i in order])
        if order != sorted(order):  # back to the callers' order
            logits = [logits[rank] for rank in sorted(range(len(order)), key=order.__getitem__)]
    except BaseException:
        # Every row as it was (its cached length only changes on success), so each can be retried
        # alone. KV the failed forward may have written lies past `cached`: never read.
        for (seq, _), n in zip(rows, before, strict=True):
            del seq.tokens[n:]
        raise
    for seq, _ in rows:
        seq._cached = len(seq.tokens)
    return logits
