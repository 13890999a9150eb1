"""Models the edge tests share: the tiny random target and the drafter that mostly agrees with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gelato.models import LoadedModel, load_model


@pytest.fixture(scope="module")
def target(pair: dict[str, Path]) -> LoadedModel:
    return load_model(str(pair["target"]), "target", "float32", "cpu")


@pytest.fixture(scope="module")
def drafter_model(pair: dict[str, Path]) -> LoadedModel:
    return load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
