"""Each layer's KV lives where the layer executes (`gelato.edge.kv_pool`): the pure map from an
accelerate device map to per-layer devices, a pool given explicit per-layer devices (all "cpu": the
same bytes as the default pool; "cpu" and "cpu:0": the several-device path, on one memory), a
target placed by accelerate on CPU and disk, and on GPUs (marked `gpu`): a layer on cuda:0 next to
layers on the CPU, and a target split over cuda:0 and cuda:1, each equal to a one-device run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gelato.edge.kv_pool import KVPool, PooledSequence, pooled_forward
from gelato.edge.placement import layer_devices, model_kv_devices
from gelato.models import LoadedModel, load_model

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def split(first: object, rest: object, layers: int = 4, at: int = 2) -> dict[str, object]:
    """A map naming the modules one by one, as accelerate's auto maps do: layers below `at` (and
    the embedding) on `first`, the others (and the norm and head) on `rest`."""
    dmap: dict[str, object] = {"model.embed_tokens": first, "model.rotary_emb": first}
    dmap |= {f"model.layers.{i}": first if i < at else rest for i in range(layers)}
    return dmap | {"model.norm": rest, "lm_head": rest}


@pytest.mark.parametrize(
    ("device_map", "layers", "main", "want"),
    [
        ({"": 0}, 3, None, [CUDA0] * 3),  # everything on GPU 0
        ({"model": 0, "lm_head": 1}, 2, None, [CUDA0] * 2),  # the whole decoder as one entry
        (split(0, 1), 4, None, [CUDA0, CUDA0, CUDA1, CUDA1]),  # module by module over two GPUs
        (split("cuda:0", "cuda:1"), 4, None, [CUDA0, CUDA0, CUDA1, CUDA1]),
        (split(0, "cpu"), 4, None, [CUDA0] * 4),  # CPU-offloaded layers run on the main device
        (split(0, "disk"), 4, None, [CUDA0] * 4),  # so do disk-offloaded ones
        (split("cpu", "disk"), 4, None, [CPU] * 4),  # no GPU: the main device is the CPU
        ({"": "disk"}, 2, None, [CPU] * 2),
        (split("disk", 1), 4, None, [CUDA1] * 4),  # the first device that is not offloaded
        (split("cpu", 0), 4, "cpu", [CPU, CPU, CUDA0, CUDA0]),  # main device given: CPU runs on CPU
        # `model.layers.1` must not be taken for `model.layers.10` / `.11`
        (split(1, 0, layers=12, at=2), 12, None, [CUDA1] * 2 + [CUDA0] * 10),
        # a layer's parts named apart, all running on one device
        ({"model.layers.0.self_attn": 0, "model.layers.0.mlp": "cpu", "model.layers.1": 0}, 2, None, [CUDA0] * 2),
        ({"model": 1, "model.layers.0.mlp": "cpu"}, 2, 1, [CUDA1] * 2),
        ({"transformer.h": 0}, 2, None, [CUDA0] * 2),  # another architecture's layer list
    ],
)
def test_layer_devices(device_map: dict, layers: int, main: object, want: list[torch.device]) -> None:
    prefix = "transformer.h" if "transformer.h" in device_map else "model.layers"
    assert layer_devices(device_map, layers, prefix, main) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device_map", "needle"),
    [
        ({"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": 0}, "names no module holding layer 1"),
        (
            {"model.layers.0.self_attn": 0, "model.layers.0.mlp": 1, "model.layers.1": 1},
            "layer 0 (model.layers.0) is split over cuda:0, cuda:1",
        ),
        ({"model": 0, "model.layers.1.mlp": 1}, "layer 1 (model.layers.1) is split over cuda:0, cuda:1"),
    ],
)
def test_layer_devices_refuses_what_the_pool_cannot_follow(device_map: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        layer_devices(device_map, 2)


def exercise(pool: KVPool) -> tuple[list[torch.Tensor], list[int]]:
    """Lone rows (prefills), a ragged batch over non-consecutive slots (the pool grows), one query
    per row, then a shrink that moves the last live row down and greedy steps on it. Every
    output (logits, then the row's KV per layer) on the CPU, and the greedy tokens."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 300) for _ in range(n)] for n in (1, 5, 17, 40)]
    blocks = [tuple(rng.randrange(1, 300) for _ in range(k)) for k in (3, 0, 8, 1)]
    seqs, spacers = [], []
    for i, prefix in enumerate(prefixes):
        seqs.append(PooledSequence(pool, prefix))
        seqs[-1].prefill(len(prefix) - 1)
        if i % 2 == 0:  # a slot between two rows: the batch is gathered, not a view
            spacers.append(PooledSequence(pool, [1, 2]))
            spacers[-1].prefill(2)
    outs = pooled_forward(list(zip(seqs, blocks, strict=True)))
    outs += pooled_forward([(seq, (7,)) for seq in seqs])
    for seq in spacers + seqs[:-1]:
        seq.release()
    pool.set_target(1, 64)
    last, token, tokens = seqs[-1], 5, []
    for _ in range(6):
        logits = last.forward([token])
        token = int(logits[-1].argmax())
        outs.append(logits)
        tokens.append(token)
    assert last.slot == 0 and pool.slots == 1, (last.slot, pool.slots)
    outs += [t for layer in range(pool.layers) for t in last.layer_kv(layer)]
    return [t.to("cpu") for t in outs], tokens


def test_explicit_cpu_devices_change_nothing(target: LoadedModel) -> None:
    """All "cpu": bit for bit the default pool. "cpu" and "cpu:0" (two devices to the pool, one
    memory): the several-device path (per-device index copies, logits brought back), also bit for
    bit. Same bytes held either way."""
    layers = target.model.config.num_hidden_layers
    assert model_kv_devices(target.model) == [CPU] * layers
    runs = {}
    for name, devices in {
        "default": None,
        "cpu": ["cpu"] * layers,
        "split": [CPU if i % 2 else torch.device("cpu", 0) for i in range(layers)],
    }.items():
        pool = KVPool(target.model, target.vocab_size, slots=2, context=16, devices=devices)
        assert bool(pool._others) == (name == "split")  # which path the forward takes
        runs[name] = (*exercise(pool), pool.nbytes(), pool.bytes_per_token())
    want_outs, want_tokens, want_bytes, want_bpt = runs["default"]
    for name in ("cpu", "split"):
        outs, tokens, nbytes, bpt = runs[name]
        assert tokens == want_tokens and (nbytes, bpt) == (want_bytes, want_bpt), name
        assert len(outs) == len(want_outs) and all(torch.equal(a, b) for a, b in zip(outs, want_outs, strict=True))
    with pytest.raises(ValueError, match="1 KV devices given for 2 layers"):
        KVPool(target.model, target.vocab_size, devices=["cpu"])


def test_pool_on_a_target_placed_on_cpu_and_disk(pair: dict[str, Path], target: LoadedModel, tmp_path: Path) -> None:
    """accelerate with 1 kB of CPU memory: everything on disk, run on the CPU: the KV goes there
    and the pool's outputs equal a plain load's."""
    placed = load_model(
        str(pair["target"]),
        "target",
        "float32",
        device_map="sequential",
        max_memory={"cpu": 1000},
        offload_folder=str(tmp_path),
    )
    assert "disk" in placed.model.hf_device_map.values(), placed.model.hf_device_map
    assert model_kv_devices(placed.model) == [CPU] * placed.model.config.num_hidden_layers
    got = exercise(KVPool(placed.model, placed.vocab_size, slots=2, context=16))
    want = exercise(KVPool(target.model, target.vocab_size, slots=2, context=16))
    assert got[1] == want[1] and all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))


def assert_same_run(got: tuple[list[torch.Tensor], list[int]], want: tuple[list[torch.Tensor], list[int]]) -> None:
    assert got[1] == want[1]  # greedy tokens
    for a, b in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pool_follows_a_layer_on_the_gpu_among_cpu_layers(pair: dict[str, Path], target: LoadedModel) -> None:
    """accelerate runs layer 0 on cuda:0 and the rest on the CPU (main device CPU): layer 0's KV
    on cuda:0, the others' on the CPU, the same outputs as the plain CPU run."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(pair["target"]), dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    model = dispatch_model(
        model, device_map=split("cpu", "cpu", layers, at=layers) | {"model.layers.0": 0}, main_device="cpu"
    )
    assert model_kv_devices(model) == [CUDA0] + [CPU] * (layers - 1)
    pool = KVPool(model, target.vocab_size, slots=2, context=16)
    got = exercise(pool)
    assert pool.keys[0].device == CUDA0 and pool.values[1].device == CPU and pool.device == CPU
    assert_same_run(got, exercise(KVPool(target.model, target.vocab_size, slots=2, context=16)))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_pool_follows_a_target_split_over_two_gpus(pair: dict[str, Path]) -> None:
    """Layers split over cuda:0 and cuda:1 by a device map: each layer's KV on its GPU, logits
    back on cuda:0, and the same logits and greedy tokens as the target on cuda:0 alone."""
    from transformers import AutoModelForCausalLM

    single = load_model(str(pair["target"]), "target", "float32", "cuda:0")
    layers = single.model.config.num_hidden_layers
    dmap = split(0, 1, layers, at=layers // 2)
    model = AutoModelForCausalLM.from_pretrained(str(pair["target"]), dtype=torch.float32, device_map=dmap).eval()
    want_devices = [CUDA0] * (layers // 2) + [CUDA1] * (layers - layers // 2)
    assert model_kv_devices(model) == want_devices
    pool = KVPool(model, single.vocab_size, slots=2, context=16)
    got = exercise(pool)
    assert [k.device for k in pool.keys] == want_devices and pool.device == CUDA0
    logits = PooledSequence(pool, [3, 4, 5]).forward([6])
    assert logits.device == CUDA0 and logits.dtype == torch.float32
    assert_same_run(got, exercise(KVPool(single.model, single.vocab_size, slots=2, context=16)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_session_on_a_gpu_target_verifies_as_on_the_cpu(
    pair: dict[str, Path], target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """A sampling session whose target runs on cuda:0 (its logits, p, on the GPU): the draws run
    on the CPU, so every round verifies as the CPU target's does (once, every sampling round
    failed on a GPU: a CPU generator and a CPU q met GPU rows)."""
    from gelato.device.drafter import Drafter
    from gelato.edge.sessions import TargetSession
    from gelato.types import SamplingParams, Verdict

    gpu = load_model(str(pair["target"]), "target", "float32", "cuda:0")
    params = SamplingParams(temperature=0.8, seed=3)
    prompt = [random.Random(7).randrange(1, 300) for _ in range(12)]
    outcomes = []
    for model in (target, gpu):
        session = TargetSession("s", model, params, list(prompt))
        session.prefill()
        drafter = Drafter(drafter_model, params)
        drafter.start(list(prompt))
        rounds = []
        for r in range(6):
            block = drafter.draft(4 if r % 2 else 0, r)  # empty blocks: the bonus draw's path too
            a, nxt = session.verify(block)
            drafter.apply(block, Verdict(round=r, n_accepted=a, next_token=nxt))
            rounds.append((block.ids, a, nxt))
        outcomes.append(rounds)
    assert outcomes[0] == outcomes[1]
