"""Models the reliability tests share (the tiny random target, loaded as a real checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gelato.models import LoadedModel, load_model


@pytest.fixture(scope="module")
def target(pair: dict[str, Path]) -> LoadedModel:
    return load_model(str(pair["target"]), "target", "float32", "cpu")
