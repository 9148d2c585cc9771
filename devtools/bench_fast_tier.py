"""`make bench-fast-tier`: the fast tier's DiT step at full size, and what it makes of a request.

Random weights decide nothing about which steps first-block caching skips, so this measures the
two kinds of cached DiT call on one GPU (FLUX.1 architecture, random weights, 1024², compiled as
served) and applies the skip shares the trained shapes model chose at each threshold
(`devtools.shapes_fast_tier --steps-for-speed 28`, `benchmarks/results/shapes-fast-tier-cpu.json`):

- `plain`: the lossless call (a CUDA graph of the whole network);
- `computed`: a cached call that runs every block (threshold below any change);
- `skipped`: a cached call that runs the first block only and adds the cached residual.

A request's DiT time at threshold t is then steps × ((1 − s) × computed + s × skipped), s the
shapes model's skip share at t and that step count: steps skipped × step time, said as such.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from devtools.bench_gpu import dit_sample, environment, median_ms
from devtools.full_size import write_full_size_folder
from flux_triton.model_info import load_model_info
from flux_triton.runtime.acceleration import Acceleration, load_network
from flux_triton.specs import CACHE_STATE, TORCH_DTYPES, ServingShape


def cached_call_times(info, precision: str, shape: ServingShape, device: str = "cuda",
                      cache_dir: str | None = None, runs: int = 5) -> dict[str, float]:
    """Median ms of a plain, a computed and a skipped DiT call at `shape` (the last two with the
    cache's state carried, as flux_bls carries it)."""
    accelerated = device.startswith("cuda")
    options = Acceleration(precision, compile=accelerated, cuda_graphs=accelerated, cache_dir=cache_dir)
    run = load_network("dit_transformer", info, device, options, (shape,) if accelerated else ()).run
    dtype = getattr(torch, TORCH_DTYPES.get(precision, "bfloat16"))
    inputs = dit_sample(info, shape, dtype, device)

    def threshold(value: float) -> dict:
        return {"cache_threshold": torch.tensor([value], dtype=torch.float32, device=device)}

    with torch.inference_mode():
        first = run(**inputs, **threshold(0.0))
        state = {name: first[name] for name in CACHE_STATE}
        assert bool(first["cache_computed"][0])
        computed = run(**inputs, **threshold(-1.0), **state)  # every change is above -1
        skipped = run(**inputs, **threshold(1e9), **state)  # and none above 1e9
        assert bool(computed["cache_computed"][0]) and not bool(skipped["cache_computed"][0])
        calls = {"plain": {}, "computed": dict(threshold(-1.0), **state),
                 "skipped": dict(threshold(1e9), **state)}
        return {name: round(median_ms(lambda extra=extra: run(**inputs, **extra), runs=runs), 2)
                for name, extra in calls.items()}


def estimates(times: dict[str, float], steps: int, shares: dict[float, float]) -> list[dict]:
    """A request's DiT time at each threshold from the call times and the skip shares."""
    lossless = steps * times["plain"]
    rows = []
    for threshold, share in sorted(shares.items()):
        dit_ms = steps * ((1 - share) * times["computed"] + share * times["skipped"])
        rows.append({"threshold": threshold, "skipped_share": share, "dit_ms": round(dit_ms, 1),
                     "lossless_dit_ms": round(lossless, 1),
                     "dit_speedup": round(lossless / dit_ms, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="dev")
    parser.add_argument("--precisions", default="FP8,BF16")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text-length", type=int, default=512)
    parser.add_argument("--shapes-result", type=Path,
                        default=Path("benchmarks/results/shapes-fast-tier-cpu.json"))
    parser.add_argument("--tokenizers-from", default="models/shapes-flux")
    parser.add_argument("--model-dir", default=None, help="instead of the full-size folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fast-tier-gpu.json"))
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-fast-tier-"))
    folder = args.model_dir or write_full_size_folder(work / args.variant, args.variant,
                                                      args.tokenizers_from)
    info = load_model_info(folder)
    size = 1024 if args.model_dir is None else info.default_height
    shape = ServingShape(1, size, size, args.text_length)
    key = f"skipped_share_at_{args.steps}_steps"
    rows = json.loads(args.shapes_result.read_text())["rows"]
    shares = {row["threshold"]: row[key] for row in rows if key in row}
    if not shares:
        parser.error(f"{args.shapes_result} has no {key}: run devtools.shapes_fast_tier "
                     f"--steps-for-speed {args.steps}")
    result = {"what": __doc__.splitlines()[0], "shape": str(shape), "steps": args.steps,
              "skip_shares_from": str(args.shapes_result), "precisions": {}}
    if args.device.startswith("cuda"):
        result["environment"] = environment()
    for precision in args.precisions.split(","):
        times = cached_call_times(info, precision, shape, args.device, str(work / "compile_cache"))
        result["precisions"][precision] = {"call_ms": times,
                                           "estimates": estimates(times, args.steps, shares)}
        print(json.dumps({precision: result["precisions"][precision]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
