"""Export FLUX.1 at full size (the real architecture, random bf16 weights: `devtools.full_size`) to
ONNX on the GPU and measure each graph: export time, peak host and GPU memory, sizes on disk, the
ONNX checker, and parity with PyTorch at one small shape in onnxruntime on the CPU.

    python -m devtools.export_full_size --variant dev --components dit_transformer --precisions BF16 \\
        --out-dir out/export-full-size --report benchmarks/results/export-full-size.json

Each component x precision is one report entry, merged into --report as soon as it is measured; its
graph is deleted afterwards unless --keep (the DiT's weights alone are 24 GB). FP8 differs from BF16
only in the DiT, so FP8 runs of the other networks are skipped. On the tiny models (--model-dir)
it runs on the CPU in seconds.

Memory plan (DiT, 11.9 B parameters): the bf16 network is built on the GPU (23.8 GB) and traced
there; the graph's initializers are written one at a time (see `flux_triton.export.onnx_export.save_program`).
They are the network's own tensors: `flux_triton.export.graph_optimizer` does not fold `Transpose(W)` into
copies (`copied_initializer_bytes` counts any initializer that is not). For parity the trace is
dropped, the same network is widened to float32 on the GPU (47.6 GB) and run once, then moved to
the host (47.6 GB) and run again by PyTorch's CPU kernels (the spread of two correct float32
answers, see SPREAD_FACTOR); it is then freed, and onnxruntime runs the float32 twin of the graph on
the CPU, reading the 23.8 GB bf16 weights file through Casts (no float32 copy of the weights on
disk; on small graphs each weight is widened only while its node runs, but at full size
onnxruntime was measured holding them all widened: 69 GiB for the DiT).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from devtools.full_size import add_folder_arguments, write_full_size_folder
from flux_triton.export.onnx_export import (
    GRAPH_DTYPES,
    ONNX_PRECISIONS,
    carries_qdq,
    export_program,
    is_reduced,
    onnx_outputs,
    parity_rows,
    reference_module,
    resolve_device,
    sample_inputs,
    save_program,
    torch_outputs,
    validate_graph,
    weight_bytes,
)
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.specs import NETWORKS, component_specs

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# A deep random network can amplify float32 rounding far past the fixed bounds: in the FP8 DiT a
# rounding that carries a value across a float8 rounding boundary moves it by a whole float8 step,
# and PyTorch's own GPU and CPU kernels put its output 7.9e-2 apart (the BF16 DiT's: 2.6e-5).
# onnxruntime is a third float32 implementation of the same function: it passes if it is no
# further from the GPU reference than twice the distance PyTorch's CPU kernels are from it. An
# export error (a wrong weight or op) moves the output by the order of its norm, far outside either.
SPREAD_FACTOR = 2.0


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Wall time, peak host RSS and peak GPU memory allocated while the block runs.

    Host: the kernel's VmHWM after resetting it, where /proc/self/clear_refs allows, and in any
    case the largest VmRSS a thread samples every 20 ms. GPU: torch.cuda.max_memory_allocated."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds = 0.0
        self.host_start = self.host_peak = 0
        self.gpu_peak: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.host_peak = max(self.host_peak, _status_bytes("VmRSS"))

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self._kernel_peak = _reset_peak_rss()
        self.host_start = self.host_peak = _status_bytes("VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.gpu_peak = torch.cuda.max_memory_allocated()
        self.seconds = time.perf_counter() - self._began
        self._stop.set()
        self._thread.join()
        self.host_peak = max(self.host_peak, _status_bytes("VmRSS"))
        if self._kernel_peak:
            self.host_peak = max(self.host_peak, _status_bytes("VmHWM"))

    def figures(self) -> dict:
        return {"seconds": round(self.seconds, 2), "host_rss_at_start_bytes": self.host_start,
                "peak_host_rss_bytes": self.host_peak, "peak_gpu_allocated_bytes": self.gpu_peak}


def copied_initializer_bytes(program, module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the program's initializers that hold memory of their own, bytes of its largest
    initializer): what saving holds in host memory beyond one tensor at a time.

    The exporter's own optimizer folds `Transpose(weight)` into a new initializer whatever its size
    (a Linear on 3-D input becomes MatMul(x, Transpose(W))): for a network on the CPU a numpy view of
    the weight (no memory of its own), for one on the GPU a host copy of it; ours keeps the weights.
    An initializer counts as the network's own when it is one of the network's GPU tensors or its
    data starts inside one of its CPU tensors."""
    storages = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    ranges = [(start, start + size) for start, size in storages.items()]
    device_tensors = {t.data_ptr() for t in (*module.parameters(), *module.buffers())
                      if t.device.type != "cpu"}

    def own(raw) -> bool:
        if isinstance(raw, torch.Tensor):
            if raw.device.type != "cpu":
                return raw.data_ptr() in device_tensors
            address = raw.data_ptr()
        elif isinstance(raw, np.ndarray):
            address = raw.__array_interface__["data"][0]
        else:
            return False
        return any(low <= address < high for low, high in ranges)

    copied = largest = 0
    for value in program.model.graph.initializers.values():
        tensor = value.const_value
        largest = max(largest, tensor.nbytes)
        if not own(getattr(tensor, "raw", None)):
            copied += tensor.nbytes
    return copied, largest


def environment(device: str) -> dict:
    """GPU, host and library versions of this run."""
    import diffusers
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import transformers

    memory = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), None)
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "host": {"cpus": os.cpu_count(), "mem_total_bytes": memory, "machine": platform.machine()},
        "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
        "onnx_ir": onnx_ir.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def parity_sizes(info: FluxModelInfo, image_size: int, text_length: int) -> dict[str, int]:
    """Axis sizes of one square `image_size`² image with a `text_length`-token prompt."""
    if image_size % info.spatial_multiple:
        raise ValueError(f"--parity-size must be a multiple of {info.spatial_multiple}")
    lat = image_size // info.vae_scale_factor
    return {"B": 1, "S_txt": text_length, "H_lat": lat, "W_lat": lat}


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class _Phases(dict):
    """Figures of each phase, passed on to `progress` with the entry as each one ends."""

    def __init__(self, entry: dict, progress):
        super().__init__()
        self.entry, self.progress = entry, progress

    def __setitem__(self, phase: str, figures: dict) -> None:
        super().__setitem__(phase, figures)
        if self.progress is not None:
            self.progress(dict(self.entry, phases=dict(self), incomplete=True))


def measure(name: str, precision: str, info: FluxModelInfo, out_dir: Path, device: str,
            sizes: dict[str, int], keep: bool = False, progress=None) -> dict:
    """Export one network in one precision, check it and compare it with PyTorch; the figures.
    `progress(entry)` gets the figures so far after each phase (a run cut short keeps them)."""
    import onnx

    cuda = device == "cuda"
    target = out_dir / precision / name / "model.onnx"
    entry: dict = {"component": name, "precision": precision,
                   "graph_dtype": GRAPH_DTYPES[precision][name], "device": device}
    phases = _Phases(entry, progress)
    try:
        with PeakMemory(cuda) as meter:
            module = reference_module(name, info, precision, device=device)
        phases["load"] = meter.figures()
        entry["parameters"] = sum(p.numel() for p in module.parameters())
        entry["weight_bytes"] = weight_bytes(module)
        with PeakMemory(cuda) as meter:
            program = export_program(name, info, module, precision)
        phases["export"] = meter.figures()
        entry["copied_initializer_bytes"], entry["largest_initializer_bytes"] = (
            copied_initializer_bytes(program, module))
        with PeakMemory(cuda) as meter:
            save_program(program, target, entry["weight_bytes"])
            del program
            _release(device)
        phases["save"] = meter.figures()
        entry["export_wall_s"] = round(phases["export"]["seconds"] + phases["save"]["seconds"], 2)
        entry["files"] = {p.name: p.stat().st_size for p in sorted(target.parent.glob(target.name + "*"))}
        entry["total_bytes"] = sum(entry["files"].values())
        inputs = [t.name for t in component_specs(info)[name].inputs]
        with PeakMemory(False) as meter:
            try:
                validate_graph(name, target, inputs, fp8=carries_qdq(name, precision))
                entry["checker"] = {"passed": True, "full_check": True, "by_path": True}
            except onnx.checker.ValidationError as exc:
                entry["checker"] = {"passed": False, "full_check": True, "by_path": True,
                                    "error": str(exc)[:2000]}
        phases["check"] = meter.figures()
        graph = onnx.load(str(target), load_external_data=False).graph
        entry["graph_nodes"] = len(graph.node)
        entry["qdq_nodes"] = sum(n.op_type in QDQ_OPS for n in graph.node)
        del graph
        cases = [sample_inputs(name, info, sizes, seed=1)]
        with PeakMemory(cuda) as meter:
            expected = torch_outputs(name, info, module, cases)
            if cuda:
                module.cpu()
            _release(device)
        phases["reference"] = meter.figures()
        spread = None
        if cuda:  # the same float32 network through PyTorch's CPU kernels: a second correct answer
            with PeakMemory(False) as meter:
                on_cpu = torch_outputs(name, info, module, cases)
            phases["reference_cpu"] = meter.figures()
            spread = parity_rows(name, precision, cases, expected, on_cpu)[0].relative_error
        del module
        _release(device)
        with PeakMemory(False) as meter:
            got = onnx_outputs(name, info, target, precision, cases)
        phases["onnxruntime"] = meter.figures()
        row = parity_rows(name, precision, cases, expected, got)[0]
        entry["parity"] = {
            "shapes": row.shapes, "sizes": sizes, "relative_error": row.relative_error,
            "max_abs_diff": row.max_abs_diff,
            "backend_spread": spread,
            "relative_error_vs_cpu_reference": (
                parity_rows(name, precision, cases, on_cpu, got)[0].relative_error if cuda else None),
            "ok": within_bound(row, spread),
            "bound": ({"relative_error": row.relative_tolerance} if row.relative_tolerance is not None
                      else {"max_abs_diff": row.tolerance}),
            "bound_from_spread": (None if spread is None
                                  else {"relative_error": SPREAD_FACTOR * spread}),
            "against": ("float32 twin (bf16 weights, float32 arithmetic) vs PyTorch with the same "
                        "weights in float32" if is_reduced(name, precision)
                        else "float32 graph vs PyTorch in float32"),
            "reference_device": device, "onnxruntime": "CPUExecutionProvider",
        }
    except Exception as exc:  # a failure is a finding: record it and go on to the next entry
        traceback.print_exc()
        entry["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    finally:
        entry["phases"] = dict(phases)
        entry["peak_host_rss_bytes"] = max((p["peak_host_rss_bytes"] for p in phases.values()), default=0)
        gpu = [p["peak_gpu_allocated_bytes"] for p in phases.values() if p["peak_gpu_allocated_bytes"]]
        entry["peak_gpu_allocated_bytes"] = max(gpu) if gpu else None
        entry["process_max_rss_bytes"] = _process_max_rss()
        if not keep:
            for path in target.parent.glob(target.name.removesuffix(".onnx") + "*"):
                path.unlink()
        _release(device)
    return entry


def within_bound(row, spread: float | None) -> bool:
    """Parity of a full-size graph: within the row's own bound, or, for a network whose float32
    output two correct PyTorch backends (GPU and CPU kernels) already put `spread` apart, within
    SPREAD_FACTOR times that spread of the reference."""
    if row.ok:
        return True
    return spread is not None and row.relative_error <= SPREAD_FACTOR * spread


def _process_max_rss() -> int:
    """getrusage's ru_maxrss (kB on Linux) of this process so far, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def entry_ok(entry: dict) -> bool:
    return ("error" not in entry and entry.get("checker", {}).get("passed", False)
            and entry.get("parity", {}).get("ok", False))


def merge_report(path: Path, model: str, entries: list[dict]) -> dict:
    """`entries` of `model` written into the report at `path`, replacing the same component and
    precision of the same model."""
    report = json.loads(path.read_text()) if path.exists() else {"entries": []}
    fresh = {(model, e["component"], e["precision"]) for e in entries}
    report["entries"] = [e for e in report["entries"]
                         if (e.get("model"), e["component"], e["precision"]) not in fresh]
    report["entries"] += [dict(e, model=model) for e in entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _summary(entry: dict) -> str:
    if "error" in entry:
        return f"{entry['component']} {entry['precision']}: ERROR {entry['error'][:300]}"
    gib = 1 << 30
    parity = entry.get("parity", {})
    return (f"{entry['component']} {entry['precision']}: export {entry['export_wall_s']:.1f} s, "
            f"{entry['total_bytes'] / 1e9:.2f} GB on disk, host peak "
            f"{entry['peak_host_rss_bytes'] / gib:.1f} GiB, GPU peak "
            f"{(entry['peak_gpu_allocated_bytes'] or 0) / gib:.1f} GiB, checker "
            f"{'ok' if entry['checker']['passed'] else 'FAILED'}, parity rel. "
            f"{parity.get('relative_error', float('nan')):.2e} max abs "
            f"{parity.get('max_abs_diff', float('nan')):.2e} {'ok' if parity.get('ok') else 'FAIL'}")


def graph_kind(name: str, precision: str) -> tuple[str, bool]:
    """What makes two precisions' graphs of a network differ: weight type, float8 Q/DQ."""
    return GRAPH_DTYPES[precision][name], carries_qdq(name, precision)


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; expected some of {list(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_folder_arguments(parser)
    parser.set_defaults(tokenizers_from="models/shapes-flux")
    parser.add_argument("--model-dir", help="export this folder instead of FLUX.1-<variant> at full size")
    parser.add_argument("--components", default=",".join(NETWORKS))
    parser.add_argument("--precisions", default="BF16,FP8")
    parser.add_argument("--out-dir", required=True, help="where the graphs (and the full-size folder) go")
    parser.add_argument("--report", required=True, help="JSON report the entries are merged into")
    parser.add_argument("--parity-size", type=int, default=256, help="parity image side in pixels")
    parser.add_argument("--parity-text", type=int, default=16, help="parity prompt length in T5 tokens")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--keep", action="store_true", help="keep the graphs (default: delete each)")
    args = parser.parse_args(argv)
    components = _names(args.components, NETWORKS, "components")
    precisions = _names(args.precisions, ONNX_PRECISIONS, "precisions")

    # Before the first CUDA allocation: lets widening the DiT to float32 reuse freed bf16 blocks.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = resolve_device(args.device)
    out_dir = Path(args.out_dir)
    if args.model_dir:
        model_dir, model = Path(args.model_dir), Path(args.model_dir).name
    else:
        model = f"FLUX.1-{args.variant} (random bf16 weights)"
        model_dir = write_full_size_folder(out_dir / f"flux1-{args.variant}", args.variant,
                                           args.tokenizers_from)
    info = load_model_info(model_dir)
    sizes = parity_sizes(info, args.parity_size, args.parity_text)
    env = environment(device)
    print(f"{model} on {env['gpu'] or device}; parity at {sizes}", flush=True)
    entries = []
    for name in components:
        for precision in precisions:
            same_as = next((p for p in precisions[:precisions.index(precision)]
                            if graph_kind(name, p) == graph_kind(name, precision)), None)
            if same_as:
                print(f"{name} {precision}: the same graph as {same_as}, skipped", flush=True)
                continue
            def progress(partial: dict) -> None:
                merge_report(Path(args.report), model, [dict(partial, environment=env)])

            entry = dict(measure(name, precision, info, out_dir, device, sizes, args.keep, progress),
                         environment=env)
            entries.append(entry)
            merge_report(Path(args.report), model, [entry])
            print(_summary(entry), flush=True)
    failed = [e for e in entries if not entry_ok(e)]
    for entry in failed:
        print(f"failed: {entry['component']} {entry['precision']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
