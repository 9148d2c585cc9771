"""The fast tier's benchmark where there is no GPU: its cached calls run as flux_bls makes them,
and its estimate is steps skipped x step time."""

import pytest

from devtools.bench_fast_tier import cached_call_times, estimates
from flux_triton.model_info import load_model_info
from flux_triton.specs import ServingShape


@pytest.mark.fast
def test_estimates_weigh_the_call_times_by_the_skip_share():
    rows = estimates({"plain": 100.0, "computed": 110.0, "skipped": 10.0}, 28, {0.0: 0.0, 0.2: 0.5})
    assert rows[0] == {"threshold": 0.0, "skipped_share": 0.0, "dit_ms": 3080.0,
                       "lossless_dit_ms": 2800.0, "dit_speedup": 0.909}
    assert rows[1]["dit_ms"] == 28 * 60.0 and rows[1]["dit_speedup"] == round(2800 / 1680, 3)


def test_cached_calls_run_computed_and_skipped_on_the_cpu(model_dirs):
    """The forced thresholds do what they say (the function asserts each call's `cache_computed`)."""
    info = load_model_info(model_dirs["dev"])
    times = cached_call_times(info, "FP32", ServingShape(1, 64, 64, 32), "cpu", runs=1)
    assert set(times) == {"plain", "computed", "skipped"} and all(t > 0 for t in times.values())
