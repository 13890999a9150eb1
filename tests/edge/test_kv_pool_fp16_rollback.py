"""A row's own rolled-back KV in float16: alone it is never read, but batched with a longer row it
is attended under the mask's large negative, which hides finite values only. An overflow there (inf
keys at a rejected draft, as a float16 Qwen2 can produce) made the row's batched logits NaN while
alone they were finite. The rolled-back positions are zeroed in float16 now."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gelato.edge.kv_pool import KVPool, PooledSequence, pooled_forward


def test_an_overflow_in_rolled_back_kv_does_not_reach_a_batched_row() -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
    )
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval().to(torch.float16)
    pool = KVPool(model, 300, slots=2, context=32)
    a, b = PooledSequence(pool), PooledSequence(pool)
    gen = torch.Generator().manual_seed(1)
    ta = torch.randint(0, 300, (30,), generator=gen).tolist()
    tb = torch.randint(0, 300, (30,), generator=gen).tolist()
    a.forward(ta[:10])
    b.forward(tb[:20])
    with torch.inference_mode():  # a rejected draft's keys overflowed (positions 8 and 9)
        for keys in pool.keys:
            keys[a.slot, :, 8:10] = float("inf")
    a.truncate(8)  # the verdict rolls them back
    solo = a.forward(ta[8:9]).clone()
    a.truncate(8)
    both = pooled_forward([(a, (ta[8],)), (b, tuple(tb[20:23]))])[0]
    assert not solo.isnan().any()
    assert not both.isnan().any()
    assert torch.allclose(solo.float(), both.float(), atol=2e-2)
