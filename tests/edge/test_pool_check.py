"""Which targets the edge's KV pool serves (`gelato.edge.pool_check.check_pool`, run at load).

Tiny random checkpoints of other architectures than Qwen2: the ones the pool serves exactly pass
the load probe and decode greedily through ragged batches as the model itself does; the ones it
cannot run (BLOOM's cache layout, DeepSeek-V3's keys and values of different widths) and a pool
whose mask is broken are refused with a precise error, and `gelato-edge` exits 2 on them instead
of reporting SERVING and failing every session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from gelato.edge import kv_pool
from gelato.edge.kv_pool import KVPool, PooledSequence, pooled_forward
from gelato.edge.pool_cache import pool_model
from gelato.edge.pool_check import check_pool
from gelato.models import LoadedModel, ModelLoadError, load_model

VOCAB = 64
SMALL = {"vocab_size": VOCAB, "max_position_embeddings": 64}
SERVED: dict[str, Any] = {
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),
    "opt": lambda: tf.OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, **SMALL
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **SMALL
    ),
    "falcon": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB),
    "mpt": lambda: tf.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, vocab_size=VOCAB),
    "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, vocab_size=VOCAB),
    "llama": lambda: tf.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **SMALL
    ),
    "phi3": lambda: tf.Phi3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        **SMALL,
    ),
    "gemma2": lambda: tf.Gemma2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        sliding_window=4096,
        **SMALL,
    ),
}
REFUSED: dict[str, Any] = {
    "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=2,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        **SMALL,
    ),
}


def loaded_from(config: Any, name: str) -> LoadedModel:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    loaded = LoadedModel(name, model, None, VOCAB, "", torch.device("cpu"), torch.float32, 64, ())
    return pool_model(loaded, quiet=True)


def own_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1, :VOCAB]
        ids.append(int(logits.argmax()))
    return ids


@pytest.mark.parametrize("arch", sorted(SERVED))
def test_served_architectures_pass_and_decode_as_themselves(arch: str) -> None:
    """The probe passes, and two prompts of different lengths decoded greedily in one ragged batch
    on the pool (prefills, then one token per row per forward) give the model's own tokens."""
    loaded = loaded_from(SERVED[arch](), arch)
    check_pool(loaded)
    prompts = [[3, 9, 27, 17, 51, 2, 40], [11, 5]]
    pool = KVPool(loaded.model, VOCAB, slots=2, context=8, max_context=64)
    seqs = [PooledSequence(pool), PooledSequence(pool)]
    out = [list(p) for p in prompts]
    nexts = [int(seq.forward(p)[-1].argmax()) for seq, p in zip(seqs, prompts, strict=True)]
    for _ in range(6):
        for row, token in zip(out, nexts, strict=True):
            row.append(token)
        logits = pooled_forward([(seq, (t,)) for seq, t in zip(seqs, nexts, strict=True)])
        nexts = [int(x[-1].argmax()) for x in logits]
    assert out == [own_greedy(loaded.model, p, 6) for p in prompts]


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_architectures_the_pool_cannot_run_are_refused(arch: str) -> None:
    with pytest.raises(ModelLoadError, match=rf"target '{arch}': the edge's KV pool cannot run this model \("):
        check_pool(loaded_from(REFUSED[arch](), arch))


def test_no_memory_for_the_probe_is_said_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that fills the device to the last byte: the probe's allocation failure goes out
    as what it is (the load's out-of-memory message), not as a model the pool cannot run."""
    loaded = loaded_from(SERVED["llama"](), "llama")

    def no_room(self: KVPool, *args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(kv_pool.KVPool, "__init__", no_room)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        check_pool(loaded)


def test_a_pool_whose_mask_hides_nothing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's comparison, not only its forwards: a pool whose mask lets every query see every
    key (padding and later positions included) runs fine and is caught by its logits."""
    init = KVPool.__init__

    def unmasked(self: KVPool, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._hidden = self._visible

    loaded = loaded_from(SERVED["llama"](), "llama")
    check_pool(loaded)
    monkeypatch.setattr(kv_pool.KVPool, "__init__", unmasked)
    with pytest.raises(ModelLoadError, match=r"logits differ from its own forward by .* of their scale"):
        check_pool(loaded)


def test_the_probe_runs_the_step_that_passes_no_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lone streamed token runs with no mask (one query per row, every row ending together),
    where transformers builds attention from the cache's sizes: the probe runs that step too, so a
    transformers that read them otherwise fails the load rather than the sessions' output."""
    forward, steps = KVPool.forward, []

    def spied(self: KVPool, rows: list[tuple[int, int, list[int]]], last_only: bool = False) -> Any:
        ends = {cached + len(ids) for _, cached, ids in rows}
        steps.append(all(len(ids) == 1 for _, _, ids in rows) and len(ends) == 1)
        return forward(self, rows, last_only)

    monkeypatch.setattr(KVPool, "forward", spied)
    check_pool(loaded_from(SERVED["llama"](), "llama"))
    assert steps.count(True) == 1 and len(steps) == 4  # two prefills, the ragged step, the lone token


def test_edge_refuses_such_a_target_at_load(pair: dict[str, Path], tmp_path: Path) -> None:
    """A real checkpoint folder (weights, config, the pair's tokenizer): `gelato-edge` exits 2 with
    one line before serving, and the same folder's loading otherwise works."""
    folder = tmp_path / "bloom"
    config = REFUSED["bloom"]()
    config.vocab_size = len(load_model(str(pair["target"]), "target", "float32", "cpu").tokenizer)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for f in Path(pair["target"]).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, folder / f.name)
    assert load_model(str(folder), "target", "float32", "cpu").vocab_size == config.vocab_size
    cmd = [sys.executable, "-m", "gelato.edge.cli", "--port", "0", "--target", str(folder)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "the edge's KV pool cannot run this model" in res.stderr and "SERVING" not in res.stdout, res.stderr
