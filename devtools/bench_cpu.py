"""`make bench`: the pipeline in-process vs the same pipeline served through Triton, in one run.

Prints a table and writes a JSON result with the machine description. Ratios are the headline:
absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from devtools.processes import free_port
from flux_triton.clients.stream_client import build_inputs, stream_generate
from flux_triton.export.repository import write_repository
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.server.launcher import TritonServer


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def in_process(info, fields: dict, runs: int) -> dict:
    """End to end, time to first preview and step times of the in-process pipeline."""
    models = TorchFluxModels(info)
    raw = {k: np.array([v.encode()], dtype=object) if isinstance(v, str) else np.array([v])
           for k, v in fields.items()}
    request = validate_request(raw, info)
    e2e, first, steps = [], [], []
    for _ in range(runs + 2):
        began = last = time.perf_counter()
        step_times = []
        for event in run_in_process(request, info, models):
            now = time.perf_counter()
            if not step_times and not isinstance(event, FinalImage):
                first.append(now - began)
            step_times.append(now - last)
            last = now
        e2e.append(time.perf_counter() - began)
        steps += step_times[1:-1]  # steps 2..N (step 1 includes the prompt encoding)
    return {"e2e_s": e2e[2:], "first_preview_s": first[2:], "step_s": steps}


def served(url: str, fields: dict, runs: int) -> dict:
    client = grpcclient.InferenceServerClient(url)
    e2e, first, steps, dit = [], [], [], []
    for _ in range(runs + 2):
        result = stream_generate(client, build_inputs(**fields), timeout_s=300)
        if result.error:
            raise RuntimeError(result.error)
        e2e.append(result.total_s)
        first.append(result.first_response_s)
        steps += [s["seconds"] for s in result.steps[1:]]
        dit += [(result.timings[f"step_{i}"][1] - result.timings[f"step_{i}"][0]) / 1000
                for i in range(2, len(result.steps) + 1)]
    client.close()
    n = 2 * (len(steps) // (runs + 2))
    return {"e2e_s": e2e[2:], "first_preview_s": first[2:], "step_s": steps[n:], "bls_step_s": dit[n:]}


def throughput(url: str, fields: dict, concurrency: int, requests: int) -> float:
    """Images per second with `concurrency` streams in flight."""
    def one(i: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            result = stream_generate(client, build_inputs(**dict(fields, seed=i)), timeout_s=300)
            if result.error:
                raise RuntimeError(result.error)
        finally:
            client.close()

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return requests / (time.perf_counter() - began)


def med(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/tiny-flux-schnell")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--throughput-requests", type=int, default=24)
    parser.add_argument("--out", default="out/bench.json")
    args = parser.parse_args(argv)

    info = load_model_info(args.model_dir)
    fields = dict(prompt="a red circle on a blue background", height=args.height, width=args.width,
                  num_inference_steps=args.steps, seed=0)
    local = in_process(info, fields, args.runs)

    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(args.model_dir, Path(tmp) / "repository")
        ports = [free_port() for _ in range(3)]
        server = TritonServer(repo, *ports, log_file=Path(tmp) / "tritonserver.log")
        ready_s = server.start()
        try:
            url = f"127.0.0.1:{ports[1]}"
            remote = served(url, fields, args.runs)
            rates = {c: throughput(url, fields, c, args.throughput_requests) for c in (1, 4, 8)}
        finally:
            server.stop()

    rows = [
        ("end to end (ms)", med(local["e2e_s"]), med(remote["e2e_s"])),
        ("time to first preview (ms)", med(local["first_preview_s"]), med(remote["first_preview_s"])),
        ("per step (ms)", med(local["step_s"]), med(remote["step_s"])),
    ]
    overhead_ms = med(remote["step_s"]) - med(local["step_s"])
    print(f"\n{args.model_dir}: {args.height}x{args.width}, {args.steps} steps, median of {args.runs}")
    print(f"{'':28} {'in-process':>11} {'served':>9} {'served/in-process':>18}")
    for name, a, b in rows:
        print(f"{name:28} {a:11.2f} {b:9.2f} {b / a:18.2f}")
    print(f"BLS orchestration overhead per step: {overhead_ms:.2f} ms "
          f"(DiT call as the BLS sees it: {med(remote['bls_step_s']):.2f} ms)")
    print("served throughput (images/s): "
          + ", ".join(f"{c} stream{'s' if c > 1 else ''} {r:.1f}" for c, r in rates.items())
          + f"; server ready in {ready_s:.1f} s")

    result = {
        "machine": machine(),
        "model_dir": str(info.model_dir),
        "request": fields,
        "runs": args.runs,
        "median_ms": {name: {"in_process": a, "served": b, "ratio": b / a} for name, a, b in rows},
        "bls_overhead_per_step_ms": overhead_ms,
        "throughput_images_per_s": {str(c): r for c, r in rates.items()},
        "server_ready_s": ready_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
