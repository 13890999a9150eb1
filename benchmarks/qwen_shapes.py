"""Random-weight checkpoints with the shapes of real Qwen2.5 models, for speed runs on a GPU.

Contract: `python -m gelato.benchmarks.qwen_shapes --shape 7b --out DIR [--device cuda] [--dtype bfloat16]
[--layers N] [--seed 0]` writes a Hugging Face folder (config.json, safetensors, tokenizer) whose
architecture is Qwen2.5-<shape>'s — hidden size, depth, attention and KV heads, MLP width, embedding
rows, tied or untied output, RoPE base — with random weights (normal, std 0.02, seeded). The
tokenizer is the built-in pair's, so any two such checkpoints share a tokenizer fingerprint and pair
up as drafter and target. Logits are sliced to its 4096 tokens exactly as they would be to Qwen's
151,665, so all compute is the real model's except that final slice. Acceptance between
random models is meaningless (near 0): these checkpoints are for batching, memory and latency,
never for quality. `--layers` cuts the depth, for quick checks on a CPU.

Shapes are those of the published Qwen2.5 config.json files (base and instruct share them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QwenShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab_rows: int
    tied: bool


SHAPES = {
    "0.5b": QwenShape(896, 4864, 24, 14, 2, 151936, True),
    "1.5b": QwenShape(1536, 8960, 28, 12, 2, 151936, True),
    "3b": QwenShape(2048, 11008, 36, 16, 2, 151936, True),
    "7b": QwenShape(3584, 18944, 28, 28, 4, 152064, False),
    "14b": QwenShape(5120, 13824, 48, 40, 8, 152064, False),
}


def build(
    shape_name: str, out: Path, device: str = "cpu", dtype: str = "bfloat16", layers: int = 0, seed: int = 0
) -> Path:
    """Write the checkpoint to `out` and return it; weights are made on `device` in `dtype`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gelato.models import default_model_path, load_tokenizer

    shape = SHAPES[shape_name]
    tokenizer = load_tokenizer(default_model_path("target"))
    eos = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=shape.vocab_rows,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers or shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tied,
        initializer_range=0.02,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # made in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parameters(shape: QwenShape, layers: int = 0) -> int:
    """Parameter count of the shape (checks the table against the published sizes)."""
    h, n = shape.hidden, layers or shape.layers
    head_dim = h // shape.heads
    attn = h * h + h + 2 * (h * shape.kv_heads * head_dim + shape.kv_heads * head_dim) + h * h
    mlp = 3 * h * shape.intermediate
    per_layer = attn + mlp + 2 * h
    embed = shape.vocab_rows * h * (1 if shape.tied else 2)
    return n * per_layer + embed + h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layers", type=int, default=0, help="fewer layers than the real model (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.layers < 0:
        p.error("--layers must be >= 0")
    t0 = time.perf_counter()
    build(args.shape, args.out, args.device, args.dtype, args.layers, args.seed)
    n = parameters(SHAPES[args.shape], args.layers)
    print(
        f"{args.out}: Qwen2.5-{args.shape} shape, {n / 1e9:.2f} B parameters, {args.dtype}, "
        f"{time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
