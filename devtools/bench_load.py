"""`make bench-load`: the shapes model served as `make export DEVICE=gpu` serves it, loaded from 1
to 128 concurrent streams, previews off and on, for several MAX_INFLIGHT / MAX_QUEUE settings.

One repository is exported (compiled, CUDA graphs, the compile cache filled once); each setting
restarts the server with MAX_INFLIGHT and MAX_QUEUE as `make serve` passes them. "unbounded" is
the server before the queue: every request runs at once. Rows go to one JSON file with the card,
driver and versions:

    python -m devtools.bench_load --inflight 1024,4,8 --concurrency 1,4,8,16,32,128 \
        --bounded 4:32 --out benchmarks/results/load-gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from devtools.processes import free_port
from flux_triton.clients.load import run_load
from flux_triton.export.repository import write_repository
from flux_triton.model_info import load_model_info
from flux_triton.server.launcher import TritonServer
from flux_triton.serving_config import MAX_INFLIGHT_ENV, MAX_QUEUE_ENV

PROMPT = "a red circle on a blue background"
UNBOUNDED = 1024  # MAX_INFLIGHT this high: every request runs at once, as before the queue


def measure(repository: Path, inflight: int, max_queue: int | None, concurrencies: list[int],
            previews: list[str], min_requests: int, per_stream: int, steps: int) -> dict:
    """Start the server with these limits, load it at every concurrency and preview setting."""
    env = {MAX_INFLIGHT_ENV: str(inflight), MAX_QUEUE_ENV: "none" if max_queue is None else str(max_queue)}
    ports = [free_port() for _ in range(3)]
    server = TritonServer(repository, *ports, log_file=repository / f"tritonserver-{inflight}.log",
                          extra_env=env)
    setting = {"max_inflight": inflight, "max_queue": max_queue, "rows": []}
    try:
        setting["ready_s"] = round(server.start(timeout_s=1500), 1)
        url = f"127.0.0.1:{ports[1]}"
        run_load(url, dict(prompt=PROMPT, preview_kind="none"), 8, 32)  # first calls off the clock
        for preview in previews:
            for concurrency in concurrencies:
                fields = dict(prompt=PROMPT, preview_kind="latent" if preview == "on" else "none")
                row = run_load(url, fields, concurrency, max(min_requests, per_stream * concurrency))
                row.update(previews=preview, max_inflight=inflight, max_queue=max_queue,
                           dit_calls_per_s=round(row["images_per_s"] * steps, 1))
                setting["rows"].append(row)
                print(f"MAX_INFLIGHT={inflight} MAX_QUEUE={max_queue} previews {preview} "
                      f"concurrency {concurrency}: {row['images_per_s']:.1f} images/s, "
                      f"p50 {row['latency_s']['p50'] or 0:.3f} s, refusals {row['refusal_s']['count']} "
                      f"(max {row['refusal_s']['max'] or 0:.3f} s), errors {row['errors'] or 'none'}",
                      flush=True)
    finally:
        server.stop()
    return setting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models/shapes-flux")
    parser.add_argument("--precision", default="BF16")
    parser.add_argument("--inflight", default=f"{UNBOUNDED},4,8",
                        help="MAX_INFLIGHT settings, unbounded queue (comma-separated)")
    parser.add_argument("--bounded", default="4:32",
                        help="MAX_INFLIGHT:MAX_QUEUE settings, comma-separated")
    parser.add_argument("--concurrency", default="1,4,8,16,32,128")
    parser.add_argument("--previews", default="off,on")
    parser.add_argument("--per-stream", type=int, default=4, help="requests per stream")
    parser.add_argument("--min-requests", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    import torch

    from devtools.bench_gpu import environment

    info = load_model_info(args.model_dir)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-load-"))
    began = time.perf_counter()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    repository = write_repository(args.model_dir, workdir / "repository", device=device,
                                  precision=args.precision if device == "gpu" else "FP32")
    result = {"model_dir": str(info.model_dir), "size": info.default_height,
              "steps": info.default_num_inference_steps, "precision": args.precision,
              "export_s": round(time.perf_counter() - began, 1),
              "environment": environment() if device == "gpu" else {"device": "cpu"},
              "settings": []}
    settings = [(int(m), None) for m in args.inflight.split(",") if m]
    settings += [(int(m), int(q)) for m, q in (b.split(":") for b in args.bounded.split(",") if b)]
    for inflight, max_queue in settings:
        result["settings"].append(measure(
            repository, inflight, max_queue, [int(c) for c in args.concurrency.split(",")],
            args.previews.split(","), args.min_requests, args.per_stream,
            info.default_num_inference_steps))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # a cut-off run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
