"""GPU speed for the PyTorch runtime: float8 Linear layers, torch.compile, CUDA graphs, and a
compile cache that survives restarts.

`Acceleration` says what to apply; `accelerate(name, module, ...)` applies it to one loaded
network. The Triton component models and the in-process runner call the same function, so both
run the same kernels.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flux_triton.loras import LoraCatalog
from flux_triton.model_info import FluxModelInfo
from flux_triton.runtime.float8 import StaticFloat8Linear, quantize_static, read_calibration
from flux_triton.runtime.loras import AdapterSwitch, MergedAdapters
from flux_triton.runtime.torch_components import load_component
from flux_triton.serving_config import COMPILE_CACHE_ENV, ServingLimits
from flux_triton.specs import IO_DTYPES, PRECISIONS, TORCH_DTYPES, ServingShape, component_specs

COMPILED = ("dit_transformer", "vae_decoder", "vae_encoder", "t5_encoder")
GRAPHED = ("clip_encoder", "t5_encoder", "text_encoder", "dit_transformer", "vae_decoder",
           "vae_encoder")
# Adapters a call may combine through captured merge programs (the default limit a request has);
# a call with more merges layer by layer.
MAX_ADAPTERS_PER_CALL = ServingLimits.max_loras
ADAPTED_PARTS = {"dit_transformer": "transformer", "clip_encoder": "text_encoder"}  # diffusers' names
log = logging.getLogger(__name__)


def compile_cache_location(repository: str | Path, configured: str | None) -> str | None:
    """The compile cache a served network of `repository` uses: $FLUX_TRITON_COMPILE_CACHE, else
    its config's compile_cache_dir (`configured`), a relative one taken from the repository."""
    cache_dir = os.environ.get(COMPILE_CACHE_ENV) or configured
    if cache_dir and not Path(cache_dir).is_absolute():
        cache_dir = str(Path(repository) / cache_dir)
    return cache_dir


@dataclass(frozen=True)
class Acceleration:
    """How a network runs on the GPU.

    precision: FP32, FP16, BF16, or FP8 (the DiT's token Linear layers in row-wise dynamic float8
    through torchao, everything else bf16). fp8_calibration: with FP8, a calibration file
    (`runtime.float8`, written by the export): those layers take static input scales from it
    instead (`FP8_SCALES=static`). fuse_qkv: the DiT's query, key and value projections as one
    Linear layer per attention (and one for the text stream's), before quantizing (`FUSE_QKV=1`).
    compile: torch.compile the DiT's blocks, the VAE decoder and encoder (channels_last) and T5,
    one static graph per shape. cuda_graphs: replay each network as one CUDA graph per input
    shape (no per-kernel launch cost, in or out of a server process).
    cache_dir: where inductor and Triton keep compiled kernels, so a restart does not compile again.
    """

    precision: str = "FP32"
    compile: bool = False
    cuda_graphs: bool = False
    cache_dir: str | None = None
    fp8_calibration: str | None = None
    fuse_qkv: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fp8_calibration is not None and self.precision != "FP8":
            raise ValueError(f"static FP8 scales (fp8_calibration) need precision FP8, got "
                             f"{self.precision}")

    @property
    def dtype(self) -> str:
        """The torch dtype name the networks are loaded in."""
        return TORCH_DTYPES[IO_DTYPES[self.precision]]

    @property
    def active(self) -> bool:
        return self.precision == "FP8" or self.compile or self.cuda_graphs or self.fuse_qkv

    @property
    def runs_on_cpu(self) -> bool:
        """Whether what it applies runs on the CPU as well: fused projections and static FP8
        (torchao's dynamic float8 has no CPU kernels; compile and graphs are for the GPU here)."""
        return not (self.compile or self.cuda_graphs) and (
            self.fuse_qkv or self.fp8_calibration is not None)


def use_compile_cache(cache_dir: str | Path) -> None:
    """Keep inductor's FX-graph, AOTAutograd and Triton kernel caches in `cache_dir` (read at the
    first compile, so call this before compiling)."""
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def is_token_linear(module: torch.nn.Module, name: str) -> bool:
    """The DiT's Linear layers that act on image and text tokens (attention and MLPs of every
    block): float8 there. The conditioning path (adaLN modulation, time/guidance/text embedders)
    and the input and output projections stay bf16: they are a sliver of the FLOPs, and the
    modulation runs on one row per image, where float8 gains nothing."""
    return (isinstance(module, torch.nn.Linear) and "transformer_blocks." in name
            and ".norm" not in name)


def token_linear_names(transformer: torch.nn.Module) -> list[str]:
    """The names of `transformer`'s layers that run in float8 (`is_token_linear`)."""
    return [n for n, m in transformer.named_modules() if is_token_linear(m, n)]


def quantize_float8(transformer: torch.nn.Module) -> int:
    """Row-wise dynamic float8 (weights and activations, e4m3) on the token Linear layers, through
    torchao; returns how many layers were converted."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    names = token_linear_names(transformer)
    chosen = set(names)
    # set_inductor_config=False: by default torchao turns on inductor's exhaustive coordinate-descent
    # tuning for the whole process, which benchmarks Triton variants of every kernel at the first
    # call: minutes before the float8 DiT is ready, with or without a filled compile cache, and every
    # other network compiled in that process pays it too (docs/performance.md, "Start-up").
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=lambda module, fqn: fqn in chosen)
    return len(names)


# Calls with these inputs decide on the host mid-call (the DiT's first-block cache: whether to
# run the other blocks), which a CUDA graph cannot: they run as they are.
UNCAPTURED_INPUTS = frozenset({"cache_threshold"})


class CudaGraphRunner:
    """Runs `forward(**tensors) -> dict of tensors` by replaying one CUDA graph per input shape.

    A graph is captured the first time a shape is seen (after two warm-up calls on a side stream)
    and replayed with the inputs copied into its static buffers; outputs are cloned, so a caller
    may keep them while the next call replays. Graphs share one memory pool (calls never overlap
    within a process); the least recently used is dropped beyond `max_graphs`.
    """

    def __init__(self, forward: Callable[..., dict[str, torch.Tensor]], max_graphs: int = 8):
        self.forward = forward
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.pool = None
        self.captures = 0  # graphs captured so far (a shape seen again is replayed, not captured)

    @staticmethod
    def key(inputs: dict[str, torch.Tensor]) -> tuple:
        return tuple((name, tuple(v.shape), v.dtype, v.device) for name, v in sorted(inputs.items()))

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        # Capture and replay on the inputs' GPU, whatever GPU is current (one process can hold
        # networks on several GPUs, as the export's precompile does).
        device = next((v.device for v in inputs.values() if v.is_cuda), None)
        if device is None or UNCAPTURED_INPUTS & inputs.keys():  # nothing to capture
            return self.forward(**inputs)
        with torch.cuda.device(device):
            return self._run(inputs)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = self.key(inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        entry = self.graphs[key]
        if entry is None:  # this shape could not be captured: run it as it is
            return self.forward(**inputs)
        static_inputs, graph, static_outputs = entry
        for name, value in inputs.items():
            static_inputs[name].copy_(value)
        graph.replay()
        return {name: value.clone() for name, value in static_outputs.items()}

    def _capture(self, inputs: dict[str, torch.Tensor]) -> tuple | None:
        try:
            return self._try_capture(inputs)
        except RuntimeError as exc:  # e.g. an operation that synchronizes with the host
            log.warning("no CUDA graph for %s: %s", self.key(inputs), exc)
            torch.cuda.synchronize()
            return None

    def _try_capture(self, inputs: dict[str, torch.Tensor]) -> tuple:
        static_inputs = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles (if compiled) and settles the allocator before capture
                self.forward(**static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        self.captures += 1
        # On the side stream, on this GPU: torch.cuda.graph's default capture stream is made once
        # per process, on whatever GPU captured first (a capture there of work here is invalid).
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            static_outputs = self.forward(**static_inputs)
        return static_inputs, graph, static_outputs


# An attention's fused layer and the separate ones whose rows it holds, in order (diffusers'
# `fuse_projections`).
FUSED_PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"),
                     "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fuse_qkv(transformer: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """diffusers' fused projections (`fuse_qkv_projections`: one GEMM for query, key and value),
    with the separate layers, which it keeps beside them, dropped; returns where each dropped
    layer's rows went: name -> (fused layer's name, first row, row past the last)."""
    transformer.fuse_qkv_projections()
    moved = {}
    for name, module in list(transformer.named_modules()):
        if not getattr(module, "fused_projections", False):
            continue
        for fused, parts in FUSED_PROJECTIONS.items():
            if not hasattr(module, fused):
                continue
            row = 0
            for part in parts:
                rows = getattr(module, part).out_features
                moved[f"{name}.{part}"] = (f"{name}.{fused}", row, row + rows)
                row += rows
                delattr(module, part)
    return moved


def accelerate(name: str, network: torch.nn.Module, options: Acceleration,
               adapters: MergedAdapters | None = None) -> Callable:
    """Apply `options` to a loaded network component (a module whose `.model` is the diffusers or
    transformers model); returns what to call instead of it. `adapters`, merged into it, follow
    its layers where they are fused."""
    model = network.model
    moved = {}
    if name == "dit_transformer" and options.fuse_qkv:
        moved = fuse_qkv(model)
        if adapters is not None:
            adapters.follow(moved)
    if name == "dit_transformer" and options.precision == "FP8" and options.fp8_calibration:
        amax = read_calibration(options.fp8_calibration)
        for layer, (fused, _, _) in moved.items():  # a fused layer's input is each of its layers'
            if layer in amax:
                amax[fused] = max(amax.get(fused, 0.0), amax[layer])
        quantize_static(model, amax, token_linear_names(model))
    elif name == "dit_transformer" and options.precision == "FP8":
        quantize_float8(model)
    if options.cache_dir and options.compile:
        use_compile_cache(options.cache_dir)
    if options.compile and name in COMPILED:
        # One static graph per shape (the warm-up shapes), rather than a dynamic-shape recompile
        # at the second shape: faster kernels, and each shape's compile is cached on its own.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        if name == "dit_transformer":
            model.compile_repeated_blocks(fullgraph=True, dynamic=False)
        elif name == "vae_decoder":
            model.to(memory_format=torch.channels_last)
            model.decoder.compile(dynamic=False)
            network.channels_last = True
        elif name == "vae_encoder":  # its input is channels_last already (VaeEncoder)
            model.to(memory_format=torch.channels_last)
            model.encoder.compile(dynamic=False)
        else:
            model.compile(dynamic=False)
    runner = CudaGraphRunner(network) if options.cuda_graphs and name in GRAPHED else network
    return AttentionPinned(runner)


# SDPA's backends in the order every accelerated call tries them: cuDNN first. Left to itself, a
# compile in a Triton model process traced the slower flash attention where a quiet process traced
# cuDNN's; the choice is baked into the compiled graph and the CUDA graph, so it is pinned for
# every compile, capture and eager call (the measurements: docs/performance.md).
ATTENTION_PRIORITY = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


class AttentionPinned:
    """Calls `runner` with SDPA's backend priority set to `ATTENTION_PRIORITY` (a backend that
    cannot take a shape passes it to the next)."""

    def __init__(self, runner: Callable[..., dict[str, torch.Tensor]]):
        from torch.nn.attention import SDPBackend

        self.runner = runner
        self.backends = [getattr(SDPBackend, name) for name in ATTENTION_PRIORITY]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backends, set_priority=True):
            return self.runner(**inputs)

    def __getattr__(self, name: str):  # the runner's counters (captures, graphs)
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)


def eager_for_new_shapes() -> None:
    """After warm-up: shapes not compiled yet run eagerly instead of compiling on a request's time
    (minutes for float8). A process-wide switch; each served model is its own process."""
    torch.compiler.set_stance("eager_on_recompile")


def sample_inputs(name: str, info: FluxModelInfo, shape: ServingShape, device: str,
                  precision: str) -> dict[str, torch.Tensor]:
    """Inputs of component `name` at `shape`, by its spec: random floats, zero token ids."""
    spec = component_specs(info, precision)[name]
    sizes = shape.axis_sizes(info)
    generator = torch.Generator(device).manual_seed(0)
    inputs = {}
    for tensor in spec.inputs:
        dims = [d if isinstance(d, int) else sizes[d] for d in tensor.dims]
        if tensor.dtype.startswith("INT"):
            inputs[tensor.name] = torch.zeros(dims, dtype=torch.int64, device=device)
        else:
            dtype = getattr(torch, TORCH_DTYPES.get(tensor.dtype, "float32"))
            inputs[tensor.name] = torch.randn(dims, generator=generator, device=device).to(dtype)
    return inputs


def compile_cache_counters() -> dict[str, int]:
    """inductor's FX-graph and AOTAutograd cache hits, misses and bypasses so far in this process
    (what tells a restart that recompiled from one that read the cache)."""
    from torch._dynamo.utils import counters

    wanted = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
              "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")}
    return {name: int(counters[group][name]) for group, names in wanted.items() for name in names}


@dataclass
class LoadedNetwork:
    """A served network: `run` maps its spec's inputs to its outputs; `adapters`, where it serves
    LoRA adapters, switches those of the calls that follow (`apply`)."""

    run: Callable[..., dict[str, torch.Tensor]]
    adapters: AdapterSwitch | MergedAdapters | None = None


def load_network(name: str, info: FluxModelInfo, device: str, options: Acceleration,
                 warmup: tuple[ServingShape, ...] = (), phases: dict | None = None,
                 loras: LoraCatalog | None = None,
                 sequence_parallel: tuple[str, ...] = ()) -> LoadedNetwork:
    """Load component `name` for `device` with `options` applied, and run it once at every warm-up
    shape (compiling and capturing there, not on a request's time).

    With `loras` (for the DiT and CLIP), those adapters: as peft layers where nothing is
    accelerated (diffusers' images bit for bit), else merged into the weights, which keeps the
    compiled code and the captured graphs (`MergedAdapters`, made before quantizing and compiling).
    `phases`, if given, receives the seconds of each phase (load, quantize and compile set-up,
    each warm-up shape, an adapter switch) and the compile-cache counters of the warm-up; they are
    logged too. `sequence_parallel` (the DiT): the devices of a group that runs it together
    (`runtime.sequence_parallel`), eager, in the options' precision.
    """
    phases = {} if phases is None else phases
    began = time.perf_counter()
    component = load_component(name, info, device, options.dtype)
    phases["load_s"] = time.perf_counter() - began
    if sequence_parallel and name == "dit_transformer":
        from flux_triton.runtime.sequence_parallel import SequenceParallelDit

        runner = SequenceParallelDit(info, sequence_parallel, options.dtype, component)
        phases["sequence_parallel_s"] = time.perf_counter() - began - phases["load_s"]
        return LoadedNetwork(runner)
    part = ADAPTED_PARTS.get(name) if loras is not None and loras.adapters else None
    accelerated = options.active and name != "tokenizer" and (
        device.startswith("cuda") or options.runs_on_cpu)
    if not accelerated:
        return LoadedNetwork(component, AdapterSwitch(component.model, part, loras) if part else None)
    merged = MergedAdapters(component.model, part, loras) if part else None
    began = time.perf_counter()
    runner = accelerate(name, component, options, merged)
    phases["prepare_s"] = time.perf_counter() - began
    if name == "dit_transformer":  # what the options made of it
        layers = dict(component.model.named_modules())
        phases["fused_projections"] = sum(n.endswith(tuple(FUSED_PROJECTIONS)) for n in layers)
        phases["float8_static_layers"] = sum(isinstance(m, StaticFloat8Linear) for m in layers.values())
    before = compile_cache_counters()
    with torch.inference_mode():
        for shape in warmup:
            began = time.perf_counter()
            runner(**sample_inputs(name, info, shape, device, options.precision))
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            phases[f"warmup_{shape}_s"] = time.perf_counter() - began
    after = compile_cache_counters()
    phases["compile_cache"] = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    if merged is not None and merged.loaded:
        # The merge programs, captured (the float8 requantization compiled) here, not on a
        # request's time; then one switch there and back, timed.
        began = time.perf_counter()
        merged.prepare_slots(MAX_ADAPTERS_PER_CALL)
        phases["adapter_slots_s"] = time.perf_counter() - began
        phases["adapter_memory_gib"] = round(merged.memory_bytes() / 2**30, 3)
        began = time.perf_counter()
        merged.apply(((sorted(merged.loaded)[0], 1.0),))
        merged.apply(())
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        phases["adapter_switch_s"] = (time.perf_counter() - began) / 2
    log.info("%s ready on %s: %s", name, device, phases)
    return LoadedNetwork(runner, merged)


def load_accelerated(name: str, info: FluxModelInfo, device: str, options: Acceleration,
                     warmup: tuple[ServingShape, ...] = (), phases: dict | None = None) -> Callable:
    """`load_network` without adapters: what to call."""
    return load_network(name, info, device, options, warmup, phases).run
