"""Which checkpoints can draft: the drafter rolls its KV back after every rejection, so a model
whose cache holds recurrent state (linear attention, Mamba) cannot draft exactly. It is refused
when it loads (`check_drafter`, run by gelato-device), with one line naming why; before, it loaded
and the first generation ended in transformers' IndexError as a traceback."""

from __future__ import annotations

import pytest
import torch
import transformers

from gelato.device.drafter import check_drafter
from gelato.models import LoadedModel, ModelLoadError

SMALL = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}


def _loaded(config_class: str, model_class: str, **fields: object) -> LoadedModel:
    config = getattr(transformers, config_class)(**fields)
    model = getattr(transformers, model_class)(config).eval()
    return LoadedModel(model_class, model, None, 100, "", torch.device("cpu"), torch.float32, 512, ())


@pytest.mark.parametrize(
    ("config_class", "model_class", "fields", "needle"),
    [
        (
            "Qwen3_5TextConfig",
            "Qwen3_5ForCausalLM",
            {**SMALL, **ATTENTION, "layer_types": ["linear_attention", "full_attention"]},
            "layers of kind linear_attention",
        ),
        ("MambaConfig", "MambaForCausalLM", {**SMALL, "state_size": 4}, "layers of kind linear_attention"),
    ],
)
def test_a_drafter_with_recurrent_layers_is_refused_at_load(
    config_class: str, model_class: str, fields: dict[str, object], needle: str
) -> None:
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    with pytest.raises(ModelLoadError, match=f"drafter '{model_class}': {needle}"):
        check_drafter(_loaded(config_class, model_class, **fields))


@pytest.mark.parametrize(
    ("config_class", "model_class", "extra"),
    [
        ("Qwen2Config", "Qwen2ForCausalLM", {}),
        ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),  # rolls back: a full cache is kept
    ],
)
def test_attention_drafters_pass(config_class: str, model_class: str, extra: dict[str, object]) -> None:
    check_drafter(_loaded(config_class, model_class, **SMALL, **ATTENTION, **extra))


def test_the_built_in_drafter_passes(drafter_model: LoadedModel) -> None:
    check_drafter(drafter_model)


def test_a_cache_that_fails_after_a_crop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that states no foreign layer kinds but whose cache breaks once cropped (as transformers'
    recurrent caches do: IndexError at the next forward) is refused by the probe, not mid-generation."""
    loaded = _loaded("Qwen2Config", "Qwen2ForCausalLM", **SMALL, **ATTENTION)
    forward, calls = loaded.model.forward, [0]

    def breaks_after_the_prefill(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] > 1:
            raise IndexError("list index out of range")
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", breaks_after_the_prefill)
    needle = r"its cache cannot be rolled back \(IndexError: list index out of range\)"
    with pytest.raises(ModelLoadError, match=needle):
        check_drafter(loaded)
