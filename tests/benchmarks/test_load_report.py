"""The reliability report's notes say what the run measured: a load wave's failed sessions are not
reported as "every verdict equal to the solo run" (the note said so whatever happened)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from gelato.benchmarks.load import markdown

RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "reliability_cpu.json"


def test_notes_of_a_clean_run_say_every_verdict_matched() -> None:
    record = json.loads(RECORD.read_text())
    assert record["failures"] == 0
    text = markdown(record)
    assert "every verdict equal to the solo run" in text and "sessions open at once" in text


def test_notes_of_a_run_with_a_differing_session_say_so() -> None:
    record = copy.deepcopy(json.loads(RECORD.read_text()))
    wave = record["phases"]["load"]["waves"][0]
    wave["failures"].append({"session": 3, "k": 4, "greedy": True, "code": "OK", "details": ""})
    record["failures"] += 1
    text = markdown(record)
    assert "every verdict equal" not in text and "open at once" not in text
    assert "sessions that ended in error or differed from their solo run, over the waves: 1 " in text


def test_a_failed_wave_check_is_not_called_a_session_and_few_sessions_are_not_claimed_at_once() -> None:
    """A wave's own checks (all open at once, batched, accepted and rejected) are counted as such,
    not as sessions that differed; and "open at once", checked from 8 sessions on only, is not
    claimed for a smaller wave."""
    record = copy.deepcopy(json.loads(RECORD.read_text()))
    wave = record["phases"]["load"]["waves"][0]
    wave["failures"].append({"max_batch_rows": 1, "expected": "> 1 (batched)"})
    record["failures"] += 1
    text = markdown(record)
    assert "waves' checks that failed: 1 (the JSON's failures)" in text and "differed from their solo" not in text
    small = copy.deepcopy(json.loads(RECORD.read_text()))
    small["phases"]["load"]["waves"][0].update(sessions=4, peak_active_sessions=4)
    text = markdown(small)
    assert "4 sessions started together" in text and "open at once" not in text
