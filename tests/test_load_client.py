"""The load client against the real server: it reports throughput, latency percentiles, time to
first response and errors by kind."""

from __future__ import annotations

import json

import pytest

from flux_triton.clients import load


@pytest.mark.fast
def test_percentiles_interpolate():
    assert load.percentile([], 50) is None
    assert load.percentile([4.0], 99) == 4.0
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert load.percentile(list(range(101)), 95) == 95


def test_load_reports_throughput_latency_and_errors(served, tmp_path, capsys):
    out = tmp_path / "load.json"
    code = load.main(["--url", served["schnell"].url, "--concurrency", "3", "--requests", "6",
                      "--steps", "2", "--height", "64", "--width", "64", "--previews", "on",
                      "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["errors"] == {} and result["images_per_s"] > 0
    latency = result["latency_s"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert 0 < result["first_preview_s"]["p50"] <= latency["p50"]
    assert "images/s" in capsys.readouterr().out
    code = load.main(["--url", served["schnell"].url, "--concurrency", "2", "--requests", "2",
                      "--height", "100", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 1 and result["errors"] == {"invalid_argument": 2}
