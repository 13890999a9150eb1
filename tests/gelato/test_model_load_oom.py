"""A model that does not fit is a load error like any other: `load_model` raises ModelLoadError
naming the role, the model, the device and dtype, and what to try, in one line (gelato-edge and
gelato-device print it as `error: ...`, exit 2). It escaped as torch's OutOfMemoryError from the
model's `.to(device)`, a traceback. Simulated: this host has no GPU, so "cuda" is pretended and
the allocation failure raised where the real one would come from."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import transformers

from gelato import models
from gelato.models import ModelLoadError, default_model_path, load_model

# torch's text for a CUDA allocation failure: one long line, ending in allocator advice.
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "1.02 GiB is free. Including non-PyTorch memory, this process has 78.17 GiB memory in use. Of the "
    "allocated memory 77.50 GiB is allocated by PyTorch, and 12.00 MiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
    "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
# What of it the message keeps: whole sentences, at most 300 characters.
CUDA_OOM_HEAD = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "1.02 GiB is free. Including non-PyTorch memory, this process has 78.17 GiB memory in use. Of the "
    "allocated memory 77.50 GiB is allocated by PyTorch, and 12.00 MiB is reserved by PyTorch but unallocated. …"
)
TARGET = default_model_path("target")


def on_a_pretended_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "resolve_device", lambda name: torch.device("cuda"))


def placing_raises(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """The loaded model's `.to(device)` raises `exc` (from_pretrained itself loads as usual)."""
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        model = real(*args, **kwargs)

        def to(*_: Any, **__: Any) -> Any:
            raise exc

        model.to = to
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)


def loading_raises(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """from_pretrained raises `exc` (accelerate places the weights while loading them)."""

    def from_pretrained(*_: Any, **__: Any) -> Any:
        raise exc

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)


def test_a_target_too_big_for_the_gpu_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    on_a_pretended_gpu(monkeypatch)
    oom = torch.OutOfMemoryError(CUDA_OOM)
    placing_raises(monkeypatch, oom)
    with pytest.raises(ModelLoadError) as info:
        load_model(TARGET, "target", "auto", "cuda")
    assert str(info.value) == (
        f"cannot place target {TARGET!r} on cuda (bfloat16): out of memory ({CUDA_OOM_HEAD}); "
        "try --device-map auto (with --max-memory) to spread it over GPUs, CPU memory and disk, or a smaller model"
    )
    assert info.value.__cause__ is oom


def test_a_float32_drafter_that_does_not_fit_is_told_of_a_smaller_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """The drafter (gelato-device) has no --device-map; a 32-bit one may fit in 16 bits."""
    on_a_pretended_gpu(monkeypatch)
    placing_raises(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB."))
    with pytest.raises(ModelLoadError) as info:
        load_model(TARGET, "drafter", "float32", "cuda")
    assert str(info.value) == (
        f"cannot place drafter {TARGET!r} on cuda (float32): out of memory (CUDA out of memory. Tried to "
        "allocate 64.00 MiB.); try a smaller --dtype (bfloat16 or float16), or a smaller model"
    )


def test_another_failure_placing_the_model_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    on_a_pretended_gpu(monkeypatch)
    placing_raises(
        monkeypatch, RuntimeError("CUDA error: no kernel image is available for execution on the device\n...")
    )
    with pytest.raises(ModelLoadError) as info:
        load_model(TARGET, "target", "auto", "cuda")
    assert str(info.value) == (
        f"cannot place target {TARGET!r} on cuda (bfloat16): "
        "RuntimeError: CUDA error: no kernel image is available for execution on the device"
    )


def test_out_of_memory_while_loading_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU allocator's failure (a RuntimeError) while from_pretrained reads the weights."""
    loading_raises(monkeypatch, RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    with pytest.raises(ModelLoadError) as info:
        load_model(TARGET, "target", "float32", "cpu")
    assert str(info.value) == (
        f"cannot load target {TARGET!r} (cpu, float32): out of memory (DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 1 GB); try a smaller --dtype (bfloat16 or float16), or --device-map auto "
        "(with --max-memory) to spread it over GPUs, CPU memory and disk, or a smaller model"
    )


def test_a_bug_while_loading_stays_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a user can act on becomes a ModelLoadError; a programming error keeps its type
    (gelato-edge still prints it in one line, tests/edge/test_cli.py)."""
    bug = RuntimeError("expected a Tensor, got NoneType")
    loading_raises(monkeypatch, bug)
    with pytest.raises(RuntimeError) as info:
        load_model(TARGET, "target", "float32", "cpu")
    assert info.value is bug


@pytest.mark.parametrize(("native", "want"), [(True, "bfloat16"), (False, "float16")])
def test_auto_dtype_takes_bf16_only_where_the_gpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, native: bool, want: str
) -> None:
    """--dtype auto on CUDA: bfloat16 where the GPU computes it natively, float16 on older ones
    (T4, V100, Jetson Xavier emulate it slowly or cuBLAS refuses it); float32 on the CPU."""
    from gelato.models import resolve_dtype

    asked: list[Any] = []

    def capability(device: Any) -> tuple[int, int]:
        asked.append(device)
        return (8, 0) if native else (7, 5)  # A100-class / T4

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == getattr(torch, want) and asked == [torch.device("cuda", 0)]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda", 0)) == torch.bfloat16  # asked for by name


def test_a_partly_cached_hub_model_is_not_loaded_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted download leaves config.json alone in the hub cache: that is not a cached
    model (it was loaded offline forever, failing 'does not appear to have a file named
    model.safetensors'); with the hub reachable the download goes on, without it the error says
    what is missing. Only config, weights and a tokenizer together load offline."""
    import huggingface_hub

    have: set[str] = {"config.json"}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f: f"/cache/{f}" if f in have else None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=5.0: True)
    assert models._hub_mode("org/model", "target") is False  # online: the download resumes
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=5.0: False)
    with pytest.raises(ModelLoadError, match=r"partly cached \(no weights, a tokenizer\) and the hub cannot"):
        models._hub_mode("org/model", "target")
    have |= {"model.safetensors.index.json", "tokenizer.json"}
    assert models._hub_mode("org/model", "target") is True
    have.clear()
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        models._hub_mode("org/model", "target")


def test_a_folder_with_only_a_tokenizer_config_is_not_a_checkpoint(tmp_path: Any) -> None:
    """tokenizer_config.json without a vocabulary loaded as an empty tokenizer (every prompt zero
    tokens); now the folder is refused naming what it lacks."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"missing a tokenizer \(tokenizer.json"):
        load_model(str(tmp_path), "drafter", "float32", "cpu")


def test_a_sharded_download_cut_after_its_first_shard_is_not_loaded_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """transformers fetches the index, then the shards one by one: a download killed after shard 1
    left config, tokenizer, index and that shard cached, which counted as whole, so every later
    run loaded it offline and failed on shard 2, never asking the hub again. Now the index's
    shards must all be there (a real index file, read as the hub cache holds it)."""
    import huggingface_hub

    index = tmp_path / "model.safetensors.index.json"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}}))
    have = {"config.json", "tokenizer.json", shards[0]}

    def find(repo: str, f: str) -> str | None:
        if f == index.name:
            return str(index)
        return f"/cache/{f}" if f in have else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", find)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=5.0: True)
    assert models._hub_mode("org/model", "target") is False  # online: the download goes on
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=5.0: False)
    with pytest.raises(ModelLoadError, match=r"partly cached \(no weights\) and the hub cannot"):
        models._hub_mode("org/model", "target")
    have.add(shards[1])  # every shard there: whole, offline
    assert models._hub_mode("org/model", "target") is True
