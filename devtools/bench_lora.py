"""`make bench-lora`: LoRA adapters on the GPU at full size (FLUX.1 architecture, random weights,
1024², one image), compiled with CUDA graphs, BF16 and FP8.

Three random rank-`rank` adapters on every attention and MLP Linear of the DiT's blocks, served as
the server serves them (`load_network`: merged into the weights in place): the DiT step without
and with an adapter, the switch time, and the compile and capture counters over 20 requests that
alternate the three adapters and none (4 DiT steps each, schnell). Against it, the other design
the issue names: the factors beside the base weights in preallocated buffers of the adapter's rank
(hot-swapped by copying, as diffusers' `enable_lora_hotswap`), an extra bf16 low-rank product in
every adapted layer, compiled and captured the same way. Results merge into `--out` by precision.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from devtools.bench_gpu import environment
from devtools.full_size import add_folder_arguments, write_full_size_folder
from flux_triton.loras import LoraCatalog, read_catalog
from flux_triton.model_info import load_model_info
from flux_triton.runtime.acceleration import (
    Acceleration,
    accelerate,
    compile_cache_counters,
    load_network,
    sample_inputs,
)
from flux_triton.runtime.loras import extract_low_rank
from flux_triton.runtime.torch_components import load_component
from flux_triton.specs import ServingShape

# Every attention and MLP Linear of the blocks (the adaLN modulation and the embedders are not).
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                 "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
ADAPTERS = ("first", "second", "third")
STEPS_PER_REQUEST = 4  # schnell


def adapted_layers(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Linear the bench adapts, from the DiT's config (no weights)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        config = FluxTransformer2DModel.load_config(model_dir / "transformer")
        dit = FluxTransformer2DModel.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in dit.named_modules()
            if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name
            and name.split(".", 2)[2] in BLOCK_LINEARS}


def write_adapters(folder: Path, layers: dict[str, tuple[int, int]], rank: int) -> LoraCatalog:
    """`ADAPTERS` with random bf16 factors N(0, 0.02) in diffusers' keys (what
    `FluxPipeline.save_lora_weights` writes; no alphas: scaling 1)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        tensors = {}
        for layer, (fan_in, fan_out) in layers.items():
            for key, shape in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
                tensors[f"transformer.{layer}.{key}.weight"] = (
                    torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / name / "pytorch_lora_weights.safetensors")
    return read_catalog(folder)


def step_ms(run, inputs: dict, runs: int = 20) -> float:
    """Median of `runs` DiT calls, CUDA events around each."""
    times = []
    for _ in range(runs + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(**inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def counters(runner) -> dict:
    """What a recompile or a recapture would change."""
    from torch._dynamo.utils import counters as dynamo

    return {"graph_captures": runner.captures, "graphs": len(runner.graphs),
            "dynamo_unique_graphs": int(dynamo["stats"]["unique_graphs"]),
            "dynamo_frames_ok": int(dynamo["frames"]["ok"]), **compile_cache_counters()}


def merged_design(info, precision: str, shape: ServingShape, catalog: LoraCatalog, requests: int) -> dict:
    """The server's design: adapters merged into the weights."""
    phases: dict = {}
    began = time.perf_counter()
    network = load_network("dit_transformer", info, "cuda",
                           Acceleration(precision, compile=True, cuda_graphs=True), (shape,), phases, catalog)
    ready_s = time.perf_counter() - began
    inputs = sample_inputs("dit_transformer", info, shape, "cuda", precision)
    row = {"ready_s": round(ready_s, 1), "phases": {k: v for k, v in phases.items() if k != "compile_cache"},
           "adapted_layers": len(network.adapters.low_rank),
           "base_copy_gib": round(sum(t.numel() * t.element_size() for t in network.adapters.base.values())
                                  / 2**30, 2)}
    with torch.inference_mode():
        row["step_ms_without"] = step_ms(network.run, inputs)
        before = counters(network.run)
        switches, steps, log = [], {}, []
        sets = itertools.cycle([((name, 1.0),) for name in ADAPTERS] + [()])
        for adapters in itertools.islice(sets, requests):
            torch.cuda.synchronize()
            began = time.perf_counter()
            network.adapters.apply(adapters)
            torch.cuda.synchronize()
            switch = (time.perf_counter() - began) * 1000
            switches.append(switch)
            label = adapters[0][0] if adapters else "none"
            for _ in range(STEPS_PER_REQUEST):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                network.run(**inputs)
                end.record()
                end.synchronize()
                steps.setdefault(label, []).append(start.elapsed_time(end))
            log.append({"adapters": label, "switch_ms": round(switch, 2)})
        after = counters(network.run)
        network.adapters.apply((("first", 1.0),))
        row["step_ms_with_adapter"] = step_ms(network.run, inputs)
        network.adapters.apply(())
    row.update(
        switch_ms_median=round(statistics.median(switches), 2), switch_ms_max=round(max(switches), 2),
        step_ms_by_adapters={k: round(statistics.median(v), 3) for k, v in steps.items()},
        counters_before=before, counters_after=after, counters_unchanged=before == after,
        requests=log)
    row["step_slowdown_pct"] = round(100 * (row["step_ms_with_adapter"] / row["step_ms_without"] - 1), 2)
    del network
    return row


class LowRankBeside(torch.nn.Module):
    """A Linear with a LoRA branch beside it in fixed buffers: base(x) + (x @ down.T) @ up.T."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        options = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.register_buffer("down", torch.zeros(rank, base.in_features, **options))
        self.register_buffer("up", torch.zeros(base.out_features, rank, **options))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up)


def unmerged_design(info, precision: str, shape: ServingShape, catalog: LoraCatalog, rank: int) -> dict:
    """The alternative: factors beside the (float8 or bf16) base in preallocated buffers."""
    options = Acceleration(precision, compile=True, cuda_graphs=True)
    component = load_component("dit_transformer", info, "cuda", options.dtype)
    one = LoraCatalog(catalog.folder, {name: catalog.adapters[name] for name in ADAPTERS[:2]})
    factors = extract_low_rank(component.model, "transformer", one)
    wrapped = {}
    for name in factors:
        parent, _, child = name.rpartition(".")
        holder = component.model.get_submodule(parent)
        wrapped[name] = LowRankBeside(getattr(holder, child), rank)
        setattr(holder, child, wrapped[name])

    def hot_swap(adapter: str) -> None:
        for name, layer in wrapped.items():
            layer.down.copy_(factors[name][adapter].down)
            layer.up.copy_(factors[name][adapter].up * factors[name][adapter].scaling)

    began = time.perf_counter()
    runner = accelerate("dit_transformer", component, options)
    inputs = sample_inputs("dit_transformer", info, shape, "cuda", precision)
    with torch.inference_mode():
        hot_swap(ADAPTERS[0])
        runner(**inputs)
        torch.cuda.synchronize()
        ready_s = time.perf_counter() - began
        before = counters(runner)
        swaps = []
        for adapter in ADAPTERS[:2] * 5:
            torch.cuda.synchronize()
            began = time.perf_counter()
            hot_swap(adapter)
            torch.cuda.synchronize()
            swaps.append((time.perf_counter() - began) * 1000)
            runner(**inputs)
        row = {"compile_and_capture_s": round(ready_s, 1), "step_ms_with_adapter": step_ms(runner, inputs),
               "switch_ms_median": round(statistics.median(swaps), 2),
               "counters_unchanged": counters(runner) == before}
    return row


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_folder_arguments(parser)
    parser.add_argument("--precisions", default="BF16,FP8")
    parser.add_argument("--designs", default="merged,unmerged")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/lora-gpu.json")
    parser.add_argument("--work", default=None, help="folder for the model and adapters (kept: a second "
                        "run reuses its adapters); default: a new temporary folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-lora-"))
    folder = write_full_size_folder(work / "flux", args.variant, args.tokenizers_from)
    info = load_model_info(folder)
    began = time.perf_counter()
    catalog = read_catalog(work / "loras")
    if sorted(catalog.adapters) != sorted(ADAPTERS) or catalog.adapters[ADAPTERS[0]].rank != args.rank:
        catalog = write_adapters(work / "loras", adapted_layers(folder), args.rank)
    shape = ServingShape(1, 1024, 1024, 256)
    print(f"{len(catalog.adapters)} adapters of rank {args.rank} written in "
          f"{time.perf_counter() - began:.1f} s: {catalog.lines()[0]}", flush=True)
    data.update(environment=environment(), setup={
        "model": f"FLUX.1-{args.variant} architecture, random bf16 weights", "shape": str(shape),
        "rank": args.rank, "adapters": len(catalog.adapters), "layers": "every attention and MLP Linear "
        "of the 19 double and 38 single blocks", "adapter_mib": round(
            catalog.adapters[ADAPTERS[0]].size_bytes / 2**20, 1), "requests": args.requests,
        "steps_per_request": STEPS_PER_REQUEST})
    for precision in args.precisions.split(","):
        data.setdefault(precision, {}).pop("unmerged_vs_merged_step_pct", None)  # only within one run
        for design in args.designs.split(","):
            if design == "merged":
                row = merged_design(info, precision, shape, catalog, args.requests)
            else:
                row = unmerged_design(info, precision, shape, catalog, args.rank)
            release()
            data.setdefault(precision, {})[design] = row
            print(precision, design, json.dumps({k: v for k, v in row.items() if k != "requests"}),
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=2) + "\n")
        rows = data[precision]
        if {"merged", "unmerged"} <= set(args.designs.split(",")):
            rows["unmerged_vs_merged_step_pct"] = round(
                100 * (rows["unmerged"]["step_ms_with_adapter"] / rows["merged"]["step_ms_without"] - 1), 2)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
