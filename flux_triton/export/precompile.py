"""Fill a GPU repository's compile cache at export, one network at a time in this process, so the
server's first start reads compiled kernels instead of compiling them itself.

Why not leave it to the server: every served network is its own process, and Triton loads them at
once. Graphs compiled there, beside sibling processes compiling, called flash attention where a
quiet process's called the faster cuDNN attention, and inductor's autotuning picked other block
sizes: the served DiT step was slower (docs/performance.md, "Served dev"). Here each network's
warm-up has the GPU to itself; the cache keys
(graph, shapes, device, torch version) are the ones the server's processes look up, so they load
what this process chose.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from pathlib import Path

from flux_triton.model_info import FluxModelInfo
from flux_triton.runtime.acceleration import Acceleration, ServingShape, load_accelerated
from flux_triton.specs import networks


def precompile(info: FluxModelInfo, options: Acceleration, warmup: Sequence[ServingShape],
               gpus: Sequence[int]) -> dict[str, dict]:
    """Load, compile and warm every network on each of `gpus` (cache keys name the device), one
    after another, writing `options.cache_dir`; the phases of each, by `network@cuda:N`."""
    import torch

    if not (options.compile and options.cache_dir and warmup):
        return {}
    Path(options.cache_dir).mkdir(parents=True, exist_ok=True)
    report = {}
    for gpu in gpus:
        device = f"cuda:{gpu}"
        for name in networks(info):
            began = time.perf_counter()
            phases: dict = {}
            runner = load_accelerated(name, info, device, options, tuple(warmup), phases)
            del runner
            gc.collect()
            torch.cuda.empty_cache()
            phases["total_s"] = round(time.perf_counter() - began, 2)
            report[f"{name}@{device}"] = phases
            print(f"precompiled {name} on {device} in {phases['total_s']:.1f} s "
                  f"(cache: {phases.get('compile_cache') or 'nothing new'})", flush=True)
    torch._dynamo.reset()  # this process's compiled graphs; the cache on disk stays
    return report
