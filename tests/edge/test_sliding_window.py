"""Targets with sliding-window attention on the KV pool (`gelato.edge.pool_cache.pool_model`).

The pool passes its own causal mask, which transformers then applies to sliding-window layers as
is: past the window such a layer would attend to keys the target itself never sees, and the
output would no longer be the target's. The edge therefore cuts the context limit to the window
(within it, sliding and full attention are the same computation) and refuses layer kinds the pool
cannot serve at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from transformers import Gemma2Config, MistralConfig, Qwen2Config

from gelato.edge.kv_pool import KVPool, PooledSequence, pooled_forward
from gelato.edge.pool_cache import attention_window, pool_model
from gelato.models import ModelLoadError, load_model
from gelato.types import PROTOCOL_VERSION
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess

WINDOW = 8


def _sliding_target(pair: dict[str, Path], tmp_path: Path, window: int = WINDOW) -> Path:
    """The tiny target with every layer's attention limited to the last `window` keys."""
    folder = tmp_path / "sliding"
    shutil.copytree(pair["target"], folder)
    config = json.loads((folder / "config.json").read_text())
    n = config["num_hidden_layers"]
    config |= {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 0}
    config["layer_types"] = ["sliding_attention"] * n
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_attention_window_reads_every_kind_of_config() -> None:
    assert attention_window(Qwen2Config()) is None  # Qwen2.5: full attention everywhere
    assert attention_window(Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1)) == 64
    assert attention_window(MistralConfig(sliding_window=4096)) == 4096  # no layer_types: every layer
    assert attention_window(MistralConfig(sliding_window=None)) is None
    assert attention_window(Gemma2Config(sliding_window=512)) == 512  # alternating sliding and full
    hybrid = Qwen2Config()
    hybrid.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        attention_window(hybrid)


def test_a_sliding_window_target_is_served_within_its_window_exactly(pair: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_model(str(_sliding_target(pair, tmp_path)), "target", "float32", "cpu")
    assert loaded.context_limit == 512
    served = pool_model(loaded)
    assert served.context_limit == WINDOW and served.model is loaded.model
    ids = list(range(5, 5 + 2 * WINDOW))
    with torch.inference_mode():
        native = loaded.model(torch.tensor([ids])).logits[0]  # transformers' own sliding window
    pool = KVPool(loaded.model, loaded.vocab_size, slots=1, context=2 * WINDOW)
    seq = PooledSequence(pool, [])
    (pooled,) = pooled_forward([(seq, tuple(ids))])
    width = pooled.shape[-1]
    # Within the window the pool's forward is the target's; past it (what the cut limit refuses)
    # it is not, which is why the limit is cut.
    torch.testing.assert_close(pooled[:WINDOW], native[:WINDOW, :width], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pooled[WINDOW:], native[WINDOW:, :width], rtol=1e-3, atol=1e-3)
    assert pool_model(served) is served  # applied twice: the same


def test_a_target_the_pool_cannot_serve_is_a_load_error(pair: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_model(str(pair["target"]), "target", "float32", "cpu")
    loaded.model.config.layer_types = ["linear_attention"] * loaded.model.config.num_hidden_layers
    try:
        with pytest.raises(ModelLoadError, match="linear_attention: the edge's KV pool serves attention layers only"):
            pool_model(loaded)
    finally:
        loaded.model.config.layer_types = ["full_attention"] * loaded.model.config.num_hidden_layers


def test_gelato_edge_advertises_the_window_as_its_context_limit(pair: dict[str, Path], tmp_path: Path) -> None:
    """A real `gelato-edge` serving that target says so in `Info` (the device plans by it) and
    refuses a prompt longer than the window at open."""
    edge = EdgeProcess(["--target", str(_sliding_target(pair, tmp_path))])
    try:
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GelatoStub(channel)
            info = stub.Info(pb.InfoRequest(), timeout=30)
            assert info.context_limit == WINDOW
            opened = list(stub.Session(iter([_open(info.tokenizer_fingerprint, list(range(5, 5 + WINDOW + 1)))])))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "context limit" in (exc.details() or ""), exc
    else:
        raise AssertionError(f"a prompt past the window was opened: {opened}")
    finally:
        edge.stop()


def _open(fingerprint: str, prompt: list[int]) -> pb.DeviceMessage:
    return pb.DeviceMessage(
        open=pb.OpenSession(
            protocol_version=PROTOCOL_VERSION, tokenizer_fingerprint=fingerprint, prefix_ids=prompt, max_new_tokens=1
        )
    )


def test_a_session_built_directly_keeps_within_the_window(pair: dict[str, Path], tmp_path: Path) -> None:
    """A `TargetSession` built on a model the server did not load (a benchmark's reference, the
    trace recorder) is cut to the window too: a block that would pass it is refused (OUT_OF_RANGE
    by the session's checks, which the server runs; the pool's own limit for a bare `verify`)
    instead of decoded with full attention."""
    from gelato.edge.sessions import StatusError, TargetSession
    from gelato.types import DraftBlock, SamplingParams

    loaded = load_model(str(_sliding_target(pair, tmp_path)), "target", "float32", "cpu")
    session = TargetSession("ref", loaded, SamplingParams(), list(range(5, 5 + WINDOW - 3)))
    session.prefill()
    assert session.loaded.context_limit == WINDOW
    session.verify(DraftBlock(round=0, ids=(7,)))  # within the window
    past = DraftBlock(round=1, ids=(7, 8, 9))
    with pytest.raises(StatusError) as info:
        session.check(past)
    assert info.value.code == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(ValueError, match="exceed the target's context limit of 8"):
        session.verify(past)
