"""devtools.bench_scale on the CPU: the scale-out table's runner, served end to end on the tiny model
(one CPU server per configuration), and the DiT batch sizes it reads from the metrics."""

import json

from devtools.bench_scale import batches_between, dit_batch_counts, main

METRICS = """# HELP flux_dit_batch_size Rows per DiT call
flux_dit_batch_size_count{gpu="0"} 10
flux_dit_batch_size_sum{gpu="0"} 30
flux_dit_batch_size_count{gpu="1"} 4
flux_dit_batch_size_sum{gpu="1"} 4
flux_dit_batch_size_count 2
flux_dit_merged_calls_total{gpu="0"} 6
flux_steps_total{gpu="0"} 99
flux_request_latency_ms_count{gpu="0"} 4
flux_request_latency_ms_sum{gpu="0"} 2000
"""


def test_dit_batches_per_gpu_from_metrics():
    after = dit_batch_counts(METRICS)
    none = {"requests": 0.0, "latency_ms_sum": 0.0}
    assert after == {"0": {"rows": 30.0, "calls": 10.0, "merged_calls": 6.0, "requests": 4.0,
                           "latency_ms_sum": 2000.0},
                     "1": {"rows": 4.0, "calls": 4.0, "merged_calls": 0.0, **none},
                     "-": {"rows": 0.0, "calls": 2.0, "merged_calls": 0.0, **none}}
    before = {"0": {"rows": 10.0, "calls": 5.0, "merged_calls": 1.0, "requests": 2.0,
                    "latency_ms_sum": 800.0}}
    delta = batches_between(before, after)
    assert delta["0"] == {"rows": 20.0, "calls": 5.0, "merged_calls": 5.0, "mean_rows_per_call": 4.0,
                          "requests": 2.0, "mean_latency_ms": 600.0}
    assert delta["1"]["mean_rows_per_call"] == 1.0 and delta["1"]["mean_latency_ms"] is None


def test_scale_table_on_the_tiny_model(tmp_path, model_dirs):
    out = tmp_path / "scale.json"
    assert main(["--gpus", "cpu", "--model-dir", str(model_dirs["schnell"]), "--batch-delays-us", "0",
                 "20000", "--sizes", "64", "--concurrency", "1,4", "--per-stream", "2", "--min-requests", "4",
                 "--workdir", str(tmp_path), "--out", str(out)]) == 0
    configs = json.loads(out.read_text())["configs"]
    assert [c["batch_delay_us"] for c in configs] == [0, 20000]
    for config in configs:
        assert [(r["size"], r["concurrency"]) for r in config["rows"]] == [(64, 1), (64, 4)]
        for row in config["rows"]:
            assert row["errors"] == {} and row["completed"] == row["requests"] >= 4
            assert row["images_per_s"] > 0
    off, on = (c["rows"][1]["dit_batches"] for c in configs)
    assert not off.get("-", {}).get("calls")  # batching off: the batcher never runs
    assert on["-"]["merged_calls"] > 0 and on["-"]["mean_rows_per_call"] > 1
    assert off["-"]["requests"] == configs[0]["rows"][1]["requests"]  # every request, counted once


def test_sequence_parallel_rows_on_the_cpu(tmp_path, model_dirs):
    """The issue-30 table's shape on the CPU: the same server with SEQUENCE_PARALLEL 1 and 2."""
    out = tmp_path / "sp.json"
    assert main(["--gpus", "cpu", "--model-dir", str(model_dirs["dev"]), "--batch-delays-us", "0",
                 "--sequence-parallel", "1", "2", "--sizes", "64", "--concurrency", "1",
                 "--per-stream", "2", "--min-requests", "2", "--workdir", str(tmp_path),
                 "--out", str(out)]) == 0
    configs = json.loads(out.read_text())["configs"]
    assert [c["sequence_parallel"] for c in configs] == [1, 2]
    assert all(r["errors"] == {} and r["completed"] == r["requests"] for c in configs
               for r in c["rows"])
