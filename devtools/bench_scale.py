"""`make bench-scale`: images/s of full-size FLUX.1 served on one GPU vs several (GPUS), with DiT
batching across streams off vs on (BATCH_DELAY_US), at several resolutions and concurrencies.

Each server configuration is exported (`flux_triton.export`, torch backend, real FLUX.1 architecture
with random bf16 weights from `devtools.full_size`), started, loaded by `flux_triton.clients.load` at every
concurrency for every size, and stopped; rows are merged into one JSON file with the card, driver
and versions, so a cut-off run keeps what it measured:

    python -m devtools.bench_scale --gpus 0 0,1 --batch-delays-us 0 2000 --sizes 1024,512 \
        --concurrency 1,2,4,8 --out benchmarks/results/scale.json

One image over several GPUs (SEQUENCE_PARALLEL, issue 30): the latency of one image is the
concurrency-1 row, against the same GPUs with SEQUENCE_PARALLEL=1:

    python -m devtools.bench_scale --variant dev --gpus 0,1 --sequence-parallel 1 2 \
        --batch-delays-us 0 --sizes 1024,2048 --concurrency 1,4 --compile 1 \
        --out benchmarks/results/sequence-parallel.json

Compilation is off by default: with batching on, merged calls come in every batch size, and a
compiled server runs sizes it was not warmed up for eagerly, which would compare compiled
single calls with eager merged ones. The table as `make export DEVICE=gpu` serves (compiled,
CUDA graphs) is `--compile 1 --batch-delays-us 0`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from devtools.bench_gpu import environment
from devtools.full_size import SERVING, write_full_size_folder
from devtools.processes import free_port
from flux_triton.clients.load import run_load
from flux_triton.export.repository import count_gpus, write_repository
from flux_triton.model_info import load_model_info
from flux_triton.placement import parse_gpus
from flux_triton.runtime.torch_components import has_random_weights
from flux_triton.server.launcher import TritonServer
from flux_triton.serving_config import ServingLimits
from flux_triton.specs import ServingShape

PROMPT = "a red circle on a blue background"


def dit_batch_counts(metrics: str) -> dict[str, dict[str, float]]:
    """DiT rows, calls and merged calls, and requests and their summed latency, so far, per GPU,
    from flux_bls's Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {"flux_dit_batch_size_sum": "rows", "flux_dit_batch_size_count": "calls",
             "flux_dit_merged_calls_total": "merged_calls", "flux_request_latency_ms_count": "requests",
             "flux_request_latency_ms_sum": "latency_ms_sum"}
    seen: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name in names:
                gpu = sample.labels.get("gpu", "-")
                entry = seen.setdefault(gpu, dict.fromkeys(names.values(), 0.0))
                entry[names[sample.name]] += sample.value
    return seen


def batches_between(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """What one load run did on each GPU: DiT calls, rows, mean rows per call, merges; requests
    and their mean latency in the server."""
    out = {}
    for gpu, entry in after.items():
        delta = {k: v - before.get(gpu, {}).get(k, 0.0) for k, v in entry.items()}
        delta["mean_rows_per_call"] = delta["rows"] / delta["calls"] if delta["calls"] else None
        delta["mean_latency_ms"] = (delta.pop("latency_ms_sum") / delta["requests"]
                                    if delta["requests"] else None)
        out[gpu] = delta
    return out


def measure_server(folder: Path, repository: Path, gpus: str | None, delay_us: int,
                   sizes: list[int], concurrencies: list[int], per_stream: int, precision: str,
                   compile: bool, max_batch: int, min_requests: int = 4,
                   sequence_parallel: int = 1) -> dict:
    """Export, start, load at every size and concurrency, stop; the rows of one configuration
    (`gpus` None: a CPU server, as the tests run it)."""
    info = load_model_info(folder)
    text, steps = info.default_max_sequence_length, info.default_num_inference_steps
    began = time.perf_counter()
    if gpus is None:
        write_repository(folder, repository, batch_delay_us=delay_us,
                         limits=ServingLimits(max_batch=max_batch), sequence_parallel=sequence_parallel,
                         random_weights=has_random_weights(folder))
    else:
        write_repository(folder, repository, device="gpu", precision=precision, gpus=gpus,
                         batch_delay_us=delay_us, compile=compile, cuda_graphs=compile,
                         warmup=tuple(ServingShape(1, size, size, text) for size in sizes),
                         limits=ServingLimits(max_batch=max_batch), sequence_parallel=sequence_parallel,
                         random_weights=has_random_weights(folder))  # the full-size folders have none
    ports = [free_port() for _ in range(3)]
    server = TritonServer(repository, *ports, log_file=repository / "tritonserver.log")
    result = {"gpus": gpus, "batch_delay_us": delay_us, "compile": compile,
              "sequence_parallel": sequence_parallel, "rows": []}
    try:
        result["ready_s"] = server.start(timeout_s=1500)
        result["export_and_ready_s"] = time.perf_counter() - began
        url = f"127.0.0.1:{ports[1]}"
        # flux_bls: one per GPU (per group of SEQUENCE_PARALLEL GPUs)
        instances = 1 if gpus is None else len(parse_gpus(gpus, count_gpus)) // sequence_parallel
        for size in sizes:
            fields = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps,
                          max_sequence_length=text, preview_kind="none")
            # First calls at this size (allocator, cuDNN plans, graphs) off the clock, on every
            # GPU: one stream at a time could leave the second GPU's first call to the table.
            run_load(url, fields, instances, 2 * instances)
            for concurrency in concurrencies:
                before = dit_batch_counts(server.metrics())
                row = run_load(url, fields, concurrency, max(min_requests, per_stream * concurrency))
                row["dit_batches"] = batches_between(before, dit_batch_counts(server.metrics()))
                row.update(size=size, gpus=gpus, batch_delay_us=delay_us,
                           sequence_parallel=sequence_parallel)
                result["rows"].append(row)
                print(f"GPUS={gpus} SEQUENCE_PARALLEL={sequence_parallel} BATCH_DELAY_US={delay_us} "
                      f"{size}² concurrency {concurrency}: "
                      f"{row['images_per_s']:.2f} images/s, p50 {row['latency_s']['p50']:.3f} s, "
                      f"errors {row['errors'] or 'none'}", flush=True)
    finally:
        server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="schnell", choices=sorted(SERVING))
    parser.add_argument("--precision", default="BF16", choices=["BF16", "FP8"])
    parser.add_argument("--gpus", nargs="+", default=["0", "0,1"],
                        help="GPUS of each configuration (`cpu`: a CPU server)")
    parser.add_argument("--batch-delays-us", nargs="+", type=int, default=[0, 2000],
                        help="BATCH_DELAY_US of each configuration (0: batching off)")
    parser.add_argument("--sequence-parallel", nargs="+", type=int, default=[1],
                        help="SEQUENCE_PARALLEL settings, each with every --gpus")
    parser.add_argument("--sizes", default="1024,512")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--per-stream", type=int, default=3, help="requests per stream")
    parser.add_argument("--min-requests", type=int, default=8,
                        help="requests per row at least (at 512² four lasted ~1 s: too few)")
    parser.add_argument("--max-batch", type=int, default=8, help="rows per merged DiT call, at most")
    parser.add_argument("--compile", type=int, choices=[0, 1], default=0)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="serve this folder instead of the full-size one (with --gpus cpu: on "
                             "the CPU, e.g. the tiny model)")
    parser.add_argument("--tokenizers-from", default="models/shapes-flux")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    folder = args.model_dir or write_full_size_folder(work / args.variant, args.variant,
                                                      args.tokenizers_from)
    sizes = [int(s) for s in args.sizes.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    data = json.loads(args.out.read_text()) if args.out.exists() else {"configs": []}
    data["environment"] = environment() if args.gpus != ["cpu"] else {"gpu": None}
    for gpus in args.gpus:
        for delay, sequence_parallel in ((d, s) for d in args.batch_delays_us
                                         for s in args.sequence_parallel):
            repository = work / f"repository-{gpus.replace(',', '_')}-{delay}-sp{sequence_parallel}"
            config = measure_server(folder, repository, None if gpus == "cpu" else gpus, delay,
                                    sizes, concurrencies, args.per_stream, args.precision,
                                    bool(args.compile), args.max_batch, args.min_requests,
                                    sequence_parallel)
            data["configs"].append(dict(config, variant=args.variant, precision=args.precision))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
