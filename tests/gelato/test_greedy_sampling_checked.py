"""proto/gelato/v1/gelato.proto: with temperature 0 (greedy) top_p/top_k are unused but still
validated, so a client sending garbage hears it (INVALID_ARGUMENT at open), not silence."""

from __future__ import annotations

import pytest

from gelato.v1 import gelato_pb2 as pb
from gelato.wire import WireError, decode_sampling


@pytest.mark.parametrize("top_p", [1.5, -0.1, float("nan")])
def test_greedy_sampling_still_checks_top_p(top_p: float) -> None:
    with pytest.raises(WireError, match="sampling: top_p must be in"):
        decode_sampling(pb.SamplingParams(temperature=0.0, top_p=top_p))


def test_greedy_sampling_with_top_p_and_top_k_in_range_is_accepted() -> None:
    params = decode_sampling(pb.SamplingParams(temperature=0.0, top_p=0.9, top_k=40))
    assert params.greedy and params.top_p == pytest.approx(0.9) and params.top_k == 40
