"""Smoke run of `make bench` (the real measurement is a script, never a timed assertion)."""

import json

from devtools import bench_cpu as bench


def test_bench_smoke(model_dirs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model-dir", str(model_dirs["schnell"]), "--height", "64", "--width", "64",
                       "--steps", "3", "--runs", "1", "--throughput-requests", "2",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"end to end (ms)", "time to first preview (ms)", "per step (ms)"}
    assert set(result["throughput_images_per_s"]) == {"1", "4", "8"}
    assert result["machine"]["cores"] >= 1 and "served/in-process" in capsys.readouterr().out


def test_backend_calls_probe_smoke(tmp_path, capsys):
    """`devtools.bench_backend_calls` times the Python backend's round trips in a real server."""
    from devtools import bench_backend_calls

    out = tmp_path / "calls.json"
    bench_backend_calls.main(["--calls", "20", "--rounds", "1", "--switch-intervals", "0.001",
                              "--out", str(out)])
    report = json.loads(out.read_text())["by_switch_interval_s"]["0.001"][0]
    assert set(report) == {"is_cancelled", "metric_increment", "metric_observe", "writer_step_each",
                           "writer_step_coalesced"}
    # (a short phase can end before the busy thread advances: its pace may read 0)
    assert all(r["alone_us"] > 0 and r["beside_a_busy_thread_us"] > 0 and r["busy_thread_pace"] >= 0
               for r in report.values())
    assert "is_cancelled" in capsys.readouterr().out
