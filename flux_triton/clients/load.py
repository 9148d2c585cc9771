"""Load a Triton FLUX server: M generations, N streams at a time, over gRPC.

    python -m flux_triton.clients.load --url 127.0.0.1:8001 --concurrency 8 --requests 32 --steps 4 \
        --height 512 --width 512 --out load.json

Prints images/s, latency percentiles, time to first preview and errors by kind (JSON with --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import tritonclient.grpc as grpcclient

from flux_triton.clients.stream_client import build_inputs, stream_generate
from flux_triton.errors import client_error_kind


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_load(url: str, fields: dict, concurrency: int, requests: int,
             timeout_s: float = 600.0) -> dict:
    """Run `requests` generations of `fields` (seed varies), `concurrency` at a time."""
    results: list[dict] = []
    lock = threading.Lock()
    next_index = iter(range(requests))

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                request = dict(fields, seed=fields.get("seed", 0) + index)
                began = time.perf_counter()
                try:
                    stream = stream_generate(client, build_inputs(**request), timeout_s=timeout_s)
                    error = stream.error
                except Exception as exc:  # a stream that breaks counts as an error, not a crash
                    stream, error = None, f"{type(exc).__name__}: {exc}"
                entry = {"latency_s": time.perf_counter() - began, "error": error,
                         "images": 0 if error or stream.image is None else len(stream.image),
                         "first_preview_s": None if stream is None else stream.first_response_s}
                with lock:
                    results.append(entry)
        finally:
            client.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ok = [r for r in results if not r["error"]]
    latencies = [r["latency_s"] for r in ok]
    refusals = [r["latency_s"] for r in results
                if r["error"] and client_error_kind(r["error"]) == "resource_exhausted"]
    firsts = [r["first_preview_s"] for r in ok if r["first_preview_s"] is not None]
    return {
        "url": url, "request": fields, "concurrency": concurrency, "requests": requests,
        "wall_s": wall, "images_per_s": sum(r["images"] for r in ok) / wall,
        "completed": len(ok),
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                      "p99": percentile(latencies, 99),
                      "mean": statistics.mean(latencies) if latencies else None},
        "first_preview_s": {"p50": percentile(firsts, 50), "p95": percentile(firsts, 95)},
        # how long a refused request (MAX_QUEUE) waited for its answer
        "refusal_s": {"count": len(refusals), "p50": percentile(refusals, 50),
                      "p99": percentile(refusals, 99), "max": max(refusals, default=None)},
        "errors": dict(Counter(client_error_kind(r["error"]) for r in results if r["error"])),
        "error_samples": sorted({r["error"][:200] for r in results if r["error"]})[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--images-per-prompt", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    parser.add_argument("--previews", choices=["on", "off"], default="off",
                        help="ask for a preview per step (off: only the image comes back)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    fields = {k: v for k, v in dict(
        prompt=args.prompt, num_inference_steps=args.steps, height=args.height, width=args.width,
        num_images_per_prompt=args.images_per_prompt, guidance_scale=args.guidance, seed=args.seed,
        preview_kind="latent" if args.previews == "on" else "none").items() if v is not None}
    result = run_load(args.url, fields, args.concurrency, args.requests)
    latency, first = result["latency_s"], result["first_preview_s"]

    def ms(value):
        return "-" if value is None else f"{value * 1000:.0f} ms"
    print(f"{result['completed']}/{args.requests} completed, concurrency {args.concurrency}: "
          f"{result['images_per_s']:.2f} images/s; latency p50 {ms(latency['p50'])}, "
          f"p95 {ms(latency['p95'])}, p99 {ms(latency['p99'])}; first response p50 "
          f"{ms(first['p50'])}; errors {result['errors'] or 'none'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["completed"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
