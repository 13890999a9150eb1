"""The text-mode summary line after each prompt: `ar-device`'s drafts are nobody's to accept (its
"accepted" counts the drafts each block emits before its last), so the line claimed an
acceptance ("accepted 93/96 drafts") that the JSON record and the README say does not exist."""

from __future__ import annotations

import pytest

from gelato.device.config import DeviceConfig
from gelato.device.run import emit

BASE = {"n_tokens": 96, "elapsed_s": 1.0, "tokens_per_s": 96.0, "rounds": 4, "stop_reason": "max_new_tokens"}


def _summary(capsys: pytest.CaptureFixture[str], rec: dict) -> str:  # type: ignore[type-arg]
    emit(DeviceConfig(prompt=["x"]), rec)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("--")]
    return line


def test_the_summary_claims_no_acceptance_where_nothing_checked_the_drafts(capsys: pytest.CaptureFixture[str]) -> None:
    local = _summary(capsys, {**BASE, "drafted": 96, "accepted": 93, "acceptance_rate": None})
    assert "accepted" not in local and "its own drafts, unchecked" in local
    verified = _summary(capsys, {**BASE, "drafted": 96, "accepted": 60, "acceptance_rate": 0.625})
    assert "accepted 60/96 drafts" in verified
    none = _summary(capsys, {**BASE, "drafted": 0, "accepted": 0, "acceptance_rate": None})
    assert "accepted 0/0 drafts" in none  # fixed-0, ar-edge: as before
