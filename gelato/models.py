"""Loading causal LMs and their tokenizers, shared by the device and the edge.

Contract: `load_model(name_or_path, role, dtype, device)` (role: "drafter" or "target", named in
errors) accepts a hub id or a local folder (any text-only causal LM the installed transformers can load)
and returns a `LoadedModel` in eval mode with its tokenizer, the tokenizer's real length
(`vocab_size`, used to slice padded logits) and the tokenizer fingerprint checked at session
open. `None` as the name means the embedded default (`gelato.tiny.assets`). Errors are
`ModelLoadError` with a message fit for a CLI.

Big-model placement: `load_model(..., device_map="auto"|"balanced"|"sequential", max_memory=...,
offload_folder=...)` lets accelerate spread the weights over the GPUs, CPU memory and disk
(`max_memory`: the most each device may hold, e.g. `{0: 20 * 2**30, "cpu": 64 * 2**30}`); the
`LoadedModel.device` is then where inputs go (the input embedding's execution device);
`gelato.edge.placement.model_kv_devices` says where each layer runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "sequential")
ASSETS = Path(__file__).resolve().parent / "tiny" / "assets"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names it and why."""


@dataclass
class LoadedModel:
    name: str
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    vocab_size: int  # the tokenizer's length; logits are sliced to it
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    context_limit: int
    eos_token_ids: tuple[int, ...]


def default_model_path(role: str) -> str:
    """The embedded default checkpoint for `role` ('target' or 'drafter')."""
    return str(ASSETS / role)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available on this host")
    if name != "cpu" and not name.startswith("cuda"):
        raise ModelLoadError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a CUDA GPU that computes it natively (Ampere and later), float16 on older
    ones (T4, V100, Jetson Xavier: bf16 emulated slowly or refused by cuBLAS), float32 on CPU (bf16
    matmuls are very slow on AVX2 CPUs)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        try:  # compute capability 8.0 (Ampere) and later compute bf16 natively
            major, _ = torch.cuda.get_device_capability(device)
        except (AssertionError, RuntimeError, ValueError):  # CUDA cannot be asked: loading will say why
            return torch.bfloat16
        return torch.bfloat16 if major >= 8 else torch.float16
    if name not in DTYPES:
        raise ModelLoadError(f"--dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what makes the same text the same ids: for a fast tokenizer its `tokenizer.json`
    parts that encode (normalizer, pre-tokenizer, model with its vocabulary and merges), its added
    tokens with their flags (special, lstrip, rstrip, normalized, single word) and whether special
    tokens' text is split as plain text (`split_special_tokens`); for a slow one its vocabulary and
    added tokens. Not which token is eos or pad: a base and an instruct checkpoint of one family
    (Qwen2.5: <|endoftext|> against <|im_end|>; Llama 3: <|end_of_text|> against <|eot_id|>) share
    every id, and the device stops at the edge's eos ids. Not what never changes an id: the post
    processor (GELATO encodes without added special tokens) and `trim_offsets` (character offsets
    only), which differ between a checkpoint's `tokenizer.json` and the same tokenizer rebuilt from
    `vocab.json` + `merges.txt`. (Protocol 1 hashed the vocabulary and the special tokens' role
    names: two tokenizers that split text differently matched; protocol 2 hashed the post processor
    and offsets too: one tokenizer shipped two ways did not.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Offsets flags live in the pre-tokenizer (and post processor); the model's vocabulary is
        # hashed as it is (a token spelled "trim_offsets" must count).
        payload: dict[str, Any] = {k: _without_offsets(spec.get(k)) for k in ("normalizer", "pre_tokenizer")}
        payload["model"] = spec.get("model")
        flags = ("special", "lstrip", "rstrip", "normalized", "single_word")
        payload["added"] = sorted(
            [t["id"], t["content"], *(t.get(f) for f in flags)] for t in spec.get("added_tokens") or []
        )
        payload["split_special_tokens"] = bool(getattr(backend, "encode_special_tokens", False))
    else:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        payload = {
            "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
            "added": sorted((i, str(t), bool(getattr(t, "special", False))) for i, t in added.items()),
            "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:32]


def _without_offsets(part: Any) -> Any:
    """A tokenizer.json part without its `trim_offsets` flags (they move character offsets, not ids)."""
    if isinstance(part, dict):
        return {k: _without_offsets(v) for k, v in part.items() if k != "trim_offsets"}
    if isinstance(part, list):
        return [_without_offsets(v) for v in part]
    return part


def eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends generation: the tokenizer's eos and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(int(i) for i in gen_eos)
    return tuple(sorted(ids))


def load_tokenizer(name: str | Path, offline: bool = True) -> Any:
    """The checkpoint's tokenizer exactly as its `tokenizer.json` defines it.

    AutoTokenizer picks a class by model type (e.g. Qwen2Tokenizer for any qwen2 config), and that
    class rebuilds the pre-tokenizer with the family's own split pattern: a checkpoint whose
    tokenizer.json says otherwise (the embedded tiny pair) would silently be tokenized differently
    from how it was trained. Checkpoints without a tokenizer.json fall back to AutoTokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(name, local_files_only=offline)


def _looks_local(name: str) -> bool:
    """A path, not a hub id (`name` or `org/name`): absolute, relative to `.`/`..`, under `~`, or
    with more than one `/` or any `\\` (no hub id has them; the hub client answered such a typo
    with a repository-id syntax error)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1 or "\\" in name


def _missing_checkpoint_parts(folder: Path) -> list[str]:
    """What a local folder lacks to be a checkpoint (empty when it looks like one)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    weights = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
    if not any(next(folder.glob(pattern), None) for pattern in weights):
        missing.append("model weights (*.safetensors or pytorch_model.bin)")
    # tokenizer_config.json alone is no tokenizer: loading then gave an empty one (every prompt
    # zero tokens, a fingerprint matching nothing).
    has = {f: (folder / f).is_file() for f in (*TOKENIZER_FILES, "merges.txt")}
    if not (has["tokenizer.json"] or has["tokenizer.model"] or (has["vocab.json"] and has["merges.txt"])):
        missing.append("a tokenizer (tokenizer.json, or vocab.json with merges.txt, or tokenizer.model)")
    return missing


# Files that hold a tokenizer's vocabulary, and files that hold a checkpoint's weights.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """One TCP connection to the hub endpoint: without it the hub client retries each file for minutes."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)  # a mirror at http://host answers on 80
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _weights_cached(name: str, find: Callable[[str, str], Any]) -> bool:
    """Whether a hub id's weights are whole in the cache (`find`: huggingface_hub's
    `try_to_load_from_cache`): one weights file, or an index with every shard it names (a sharded
    download cut after its first shard left the index and that shard: loaded offline, it failed
    on the next shard every time, the hub never asked again). An index that cannot be read is
    taken at its word: the load then says what is wrong with it."""
    for f in WEIGHT_FILES:
        path = find(name, f)
        if not isinstance(path, str):
            continue
        if not f.endswith(".index.json"):
            return True
        try:
            shards = set(json.loads(Path(path).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return True
        if all(isinstance(find(name, shard), str) for shard in shards):
            return True
    return False


def _hub_mode(name: str, role: str) -> bool:
    """Whether to load a hub id offline: from the local cache when it is there (no network at all),
    online when the hub answers; otherwise a one-line error instead of minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return True
    from huggingface_hub import try_to_load_from_cache

    def cached(*files: str) -> bool:
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)

    # Whole in the cache: config, weights and tokenizer (an interrupted download leaves config.json
    # alone, and loading that offline forever said the repository had no weights).
    parts = {
        "config.json": cached("config.json"),
        "weights": _weights_cached(name, try_to_load_from_cache),
        "a tokenizer": cached(*TOKENIZER_FILES),
    }
    if all(parts.values()):
        return True
    if not _hub_reachable():
        partly = any(parts.values())
        what = (
            f"partly cached (no {', '.join(k for k, v in parts.items() if not v)})"
            if partly
            else "not in the local cache"
        )
        typo = f" (no local folder {name!r} either)" if Path(name.split("/")[0]).is_dir() else ""
        raise ModelLoadError(
            f"cannot load {role} {name!r}: it is {what} and the hub cannot be reached{typo}; "
            "pass a local folder, or set HF_HUB_OFFLINE=1 once it is cached"
        )
    return False


def _placement_kwargs(
    device: str, device_map: str | None, max_memory: dict[int | str, int] | None, offload_folder: str | None
) -> dict[str, Any]:
    """from_pretrained's placement arguments (checked: a wrong one fails before any weight is read)."""
    if device_map is None:
        if max_memory or offload_folder:
            raise ModelLoadError("--max-memory and --offload-folder need --device-map")
        return {}
    if device_map not in DEVICE_MAPS:
        raise ModelLoadError(f"--device-map must be {', '.join(DEVICE_MAPS)}; got {device_map!r}")
    if device != "auto":
        raise ModelLoadError(
            f"--device {device} and --device-map {device_map} exclude each other: the map places the model"
        )
    try:
        import accelerate  # noqa: F401  (transformers places through it)
    except ImportError:
        raise ModelLoadError("--device-map needs the accelerate package (pip install accelerate)") from None
    if max_memory:
        gpus = torch.cuda.device_count()
        missing = [k for k in max_memory if isinstance(k, int) and k >= gpus]
        if missing:
            raise ModelLoadError(f"--max-memory names GPU {missing[0]}, but this host has {gpus} GPU(s)")
    kw: dict[str, Any] = {"device_map": device_map}
    if max_memory:
        kw["max_memory"] = dict(max_memory)
    if offload_folder:
        kw["offload_folder"] = offload_folder
    return kw


def input_device(model: Any) -> torch.device:
    """Where a forward's inputs go: the input embedding's execution device."""
    emb = model.get_input_embeddings()
    where = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if where is not None:
        return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)
    return emb.weight.device


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: CUDA's `OutOfMemoryError` (a RuntimeError), Python's MemoryError, or
    the RuntimeError of the CPU (or MPS) allocator."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The head of an exception's text, fit for a one-line error: its first line, at most `limit`
    characters, cut after a sentence where it can be (CUDA's OOM text runs on to allocator advice)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind(". ")
    return (head[: cut + 1] if cut > 0 else head) + " …"


def _malformed_json(folder: Path) -> str | None:
    """The first JSON file of a checkpoint folder that does not parse (a JSONDecodeError names no file)."""
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return path.name
    return None


def load_failure(role: str, name: str | None, exc: BaseException) -> str:
    """The one-line message for a load that failed in a way `load_model` does not foresee (a bug,
    a failure below transformers): the model, the exception's type and its first line."""
    model = repr(name) if name else "(the embedded default)"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"cannot load {role} {model}: {type(exc).__name__}: {first}"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _no_memory(what: str, exc: BaseException, role: str, dt: torch.dtype) -> str:
    """The one-line message for a model that did not fit, with what to try."""
    tries = [] if dt in (torch.bfloat16, torch.float16) else ["a smaller --dtype (bfloat16 or float16)"]
    if role == "target":
        tries.append("--device-map auto (with --max-memory) to spread it over GPUs, CPU memory and disk")
    tries.append("a smaller model")
    return f"{what}: out of memory ({_first_line(exc)}); try {', or '.join(tries)}"


def load_model(
    name_or_path: str | None,
    role: str,
    dtype: str = "auto",
    device: str = "auto",
    *,
    device_map: str | None = None,
    max_memory: dict[int | str, int] | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id or a local folder; with `device_map`,
    placed by accelerate over GPUs, CPU and disk (module docstring)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep CLI output to what the user asked for
    name = name_or_path or default_model_path(role)
    if name_or_path is None and not Path(name).is_dir():
        raise ModelLoadError(f"the embedded default {role} is missing at {name}")
    if _looks_local(name):
        if not Path(name).expanduser().is_dir():  # else the hub client answers with a repo-id syntax error
            raise ModelLoadError(f"cannot load {role} {name!r}: no such local folder")
        name = str(Path(name).expanduser())
    local = Path(name).is_dir()
    missing = _missing_checkpoint_parts(Path(name)) if local else []
    if missing:
        raise ModelLoadError(f"cannot load {role} {name!r}: not a checkpoint folder, missing {', '.join(missing)}")
    placement = _placement_kwargs(device, device_map, max_memory, offload_folder)
    dev = resolve_device("auto" if placement else device)
    dt = resolve_dtype(dtype, dev)
    offline = local or _hub_mode(name, role)
    try:
        tokenizer = load_tokenizer(name, offline)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, local_files_only=offline, **placement)
    except (OSError, ValueError) as exc:
        hint = " (give --offload-folder, or more --max-memory)" if "offload_folder" in str(exc) else ""
        bad = _malformed_json(Path(name)) if local and isinstance(exc, json.JSONDecodeError) else None
        what = f"{bad} is not valid JSON ({_first_line(exc)})" if bad else _first_line(exc)
        raise ModelLoadError(f"cannot load {role} {name!r}: {what}{hint}") from exc
    except (MemoryError, RuntimeError) as exc:  # accelerate places while loading: its OOM comes here
        if not out_of_memory(exc):
            raise
        where = f"--device-map {device_map}" if placement else str(dev)
        raise ModelLoadError(
            _no_memory(f"cannot load {role} {name!r} ({where}, {_dtype_name(dt)})", exc, role, dt)
        ) from exc
    if placement:  # accelerate placed it (and hooks move activations between devices): no .to()
        model = model.eval()
        dev = input_device(model)
    else:
        try:
            model = model.to(dev).eval()  # type: ignore[arg-type]
        except (MemoryError, RuntimeError) as exc:  # out of memory, or a device that cannot take it
            what = f"cannot place {role} {name!r} on {dev} ({_dtype_name(dt)})"
            if out_of_memory(exc):
                raise ModelLoadError(_no_memory(what, exc, role, dt)) from exc
            raise ModelLoadError(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from exc
    if hasattr(model.config, "get_text_config") and model.config.get_text_config() is not model.config:
        # A multimodal checkpoint (Gemma 3 4B+, Llama 4): its text model's settings are nested, which
        # the KV pool, the placement and the context limit read at the top (an AttributeError later).
        raise ModelLoadError(
            f"cannot load {role} {name!r}: {type(model).__name__} is a multimodal model (its text settings are "
            "nested); give its text-only checkpoint"
        )
    vocab = len(tokenizer)
    if vocab > model.config.vocab_size:
        raise ModelLoadError(
            f"{role} {name!r}: tokenizer has {vocab} tokens but the model only {model.config.vocab_size} logits"
        )
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        vocab_size=vocab,
        fingerprint=tokenizer_fingerprint(tokenizer),
        device=dev,
        dtype=dt,
        context_limit=limit,
        eos_token_ids=eos_ids(model, tokenizer),
    )


def encode_prompt(tokenizer: Any, text: str, chat_template: bool = True) -> list[int]:
    """Prompt token ids: through the chat template when the tokenizer has one (and it is wanted;
    the template writes its own BOS), else the plain text as the tokenizer encodes it, with the
    special tokens it adds (a Llama or Gemma base model's BOS: without it their text degrades)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
