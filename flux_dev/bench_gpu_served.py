"""(c): the pipeline served through tritonserver on the GPU, measured with the streaming client.

Run on a GPU machine whose model environment has numpy<2 (see benchmarks/gpu_env.sh): writes the
full-size folder, renders a GPU/BF16 repository with the DiT compiled, starts tritonserver and
streams generations at 1024x1024.

    python -m flux_dev.bench_gpu_served --variant schnell --out served.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from clients.stream_client import build_inputs, stream_generate
from export.repository import write_repository
from flux_dev.full_size import SERVING, benchmark_parser, write_full_size_folder
from flux_dev.tritonserver import TritonServer, free_port


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--eager", action="store_true", help="do not compile the served DiT")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp())
    folder = write_full_size_folder(root / args.variant, args.variant, args.tokenizers_from)
    repo = write_repository(folder, root / "repository", device="gpu", precision="BF16",
                            compile_dit=not args.eager)
    ports = [free_port() for _ in range(3)]
    server = TritonServer(repo, *ports, log_file=root / "tritonserver.log",
                          extra_args=["--cuda-memory-pool-byte-size=0:268435456"])
    defaults = SERVING[args.variant]
    steps, max_seq = defaults["default_num_inference_steps"], defaults["default_max_sequence_length"]
    result = {"variant": args.variant, "height": 1024, "width": 1024, "steps": steps, "batches": {}}
    try:
        result["server_ready_s"] = server.start(timeout_s=900)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        guidance = defaults["default_guidance_scale"]
        for batch in [int(b) for b in args.batches.split(",")]:
            fields = dict(prompt="a red circle on a blue background", num_images_per_prompt=batch,
                          height=1024, width=1024, num_inference_steps=steps,
                          max_sequence_length=max_seq, guidance_scale=guidance, seed=0)
            began = time.perf_counter()
            warm = stream_generate(client, build_inputs(**fields), timeout_s=900)  # compiles the DiT
            if warm.error:
                raise RuntimeError(warm.error)
            warmup_s = time.perf_counter() - began
            runs = [stream_generate(client, build_inputs(**fields), timeout_s=900)
                    for _ in range(args.runs if batch == 1 else max(1, args.runs - 1))]
            intervals = [s["seconds"] for r in runs for s in r.steps[1:]]
            dit = [(r.timings[f"step_{i}"][1] - r.timings[f"step_{i}"][0])
                   for r in runs for i in range(2, len(r.steps) + 1)]
            result["batches"][str(batch)] = {
                "c_served": {
                    "e2e_s": statistics.median(r.total_s for r in runs),
                    "first_preview_s": statistics.median(r.first_response_s for r in runs),
                    "step_interval_ms": statistics.median(intervals) * 1000,
                    "bls_dit_call_ms": statistics.median(dit),
                    "server_stage_ms": {k: v[1] - v[0] for k, v in runs[-1].timings.items()
                                        if isinstance(v, list)},
                    "first_request_s": warmup_s,
                }
            }
            print(json.dumps({batch: result["batches"][str(batch)]}), flush=True)
        metrics = server.metrics().splitlines()
        result["metrics_sample"] = [line for line in metrics if line.startswith((
            "flux_gpu_memory", "nv_gpu_memory_used", "nv_inference_compute_infer_duration_us",
            "nv_inference_exec_count", "nv_inference_compute_input_duration_us",
            "nv_inference_compute_output_duration_us"))]
        print("\n".join(line for line in result["metrics_sample"] if "dit_transformer" in line))
    finally:
        server.stop()
        log = (root / "tritonserver.log").read_text(errors="replace")
        print("\n".join(line for line in log.splitlines() if line.startswith(("E", "W")))[-3000:])
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
