"""The full-size export measurement (`devtools.export_full_size`), run on the tiny dev model on the
CPU, and the two things that let it fit at full size: weights saved one tensor at a time, and a
float32 twin that reads the graph's own bf16 weights file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from devtools.export_full_size import SPREAD_FACTOR, PeakMemory, copied_initializer_bytes, main, within_bound
from flux_triton.export.onnx_export import (
    EXTERNAL_DATA_BYTES,
    REDUCED_RELATIVE_TOLERANCE,
    ParityRow,
    parity_session,
    save_program,
)
from flux_triton.export.quantization import write_float32_twin

ENTRY_FIELDS = {
    "component", "precision", "graph_dtype", "device", "parameters", "weight_bytes",
    "copied_initializer_bytes", "largest_initializer_bytes", "export_wall_s", "files", "total_bytes",
    "checker", "graph_nodes", "qdq_nodes", "parity", "phases", "peak_host_rss_bytes",
    "peak_gpu_allocated_bytes", "process_max_rss_bytes", "environment", "model",
}
PHASES = {"load", "export", "save", "check", "reference", "onnxruntime"}


def test_report_has_every_figure_for_each_graph(model_dirs, tmp_path):
    report = tmp_path / "report.json"
    common = ["--model-dir", str(model_dirs["dev"]), "--out-dir", str(tmp_path / "graphs"),
              "--report", str(report), "--parity-size", "64", "--parity-text", "16"]
    assert main([*common, "--components", "clip_encoder,dit_transformer,vae_encoder",
                 "--precisions", "BF16,FP8", "--keep"]) == 0
    entries = {(e["component"], e["precision"]): e for e in json.loads(report.read_text())["entries"]}
    # FP8 changes only the DiT: CLIP's and the VAE encoder's FP8 graphs would be their BF16 ones again
    assert set(entries) == {("clip_encoder", "BF16"), ("dit_transformer", "BF16"),
                            ("dit_transformer", "FP8"), ("vae_encoder", "BF16")}
    assert entries["vae_encoder", "BF16"]["graph_dtype"] == "float32"  # no bf16 Conv before opset 22
    for (name, precision), entry in entries.items():
        assert ENTRY_FIELDS <= set(entry), ENTRY_FIELDS - set(entry)
        assert "error" not in entry and "incomplete" not in entry and entry["checker"]["passed"]
        assert set(entry["phases"]) == PHASES
        assert all(p["peak_host_rss_bytes"] > 0 and p["seconds"] >= 0 for p in entry["phases"].values())
        assert entry["peak_host_rss_bytes"] >= entry["phases"]["save"]["peak_host_rss_bytes"]
        assert entry["parity"]["ok"] and entry["parity"]["relative_error"] <= REDUCED_RELATIVE_TOLERANCE
        assert entry["parity"]["sizes"] == {"B": 1, "S_txt": 16, "H_lat": 8, "W_lat": 8}
        assert {"torch", "onnx", "onnxruntime", "gpu"} <= set(entry["environment"])
        graph = tmp_path / "graphs" / precision / name / "model.onnx"
        assert entry["files"] == {"model.onnx": graph.stat().st_size}  # tiny: no external data
        nodes = onnx.load(str(graph)).graph.node
        quantize = [n for n in nodes if n.op_type == "QuantizeLinear"]
        assert entry["qdq_nodes"] == sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes)
        assert bool(quantize) == (precision == "FP8" and name == "dit_transformer")
    assert entries["dit_transformer", "BF16"]["weight_bytes"] == 2 * entries["dit_transformer", "BF16"][
        "parameters"]

    # a second run replaces its entry in the report and, without --keep, deletes its graph
    assert main([*common, "--components", "clip_encoder", "--precisions", "BF16"]) == 0
    merged = json.loads(report.read_text())["entries"]
    assert sorted((e["component"], e["precision"]) for e in merged) == sorted(entries)
    assert not list((tmp_path / "graphs" / "BF16" / "clip_encoder").iterdir())


def test_parity_bound_widens_only_with_a_measured_backend_spread():
    """A full-size graph off its fixed bound passes only where PyTorch's CPU and GPU kernels already
    disagree: within SPREAD_FACTOR times their spread, never without one (the CPU runs)."""
    off = ParityRow("t5_encoder", "", 0.3, 1e-4, relative_error=0.07, relative_tolerance=2e-3)
    assert not off.ok and not within_bound(off, None)
    assert within_bound(off, 0.07 / SPREAD_FACTOR) and not within_bound(off, 0.07 / SPREAD_FACTOR / 1.1)
    near = ParityRow("t5_encoder", "", 1e-3, 1e-4, relative_error=1e-3, relative_tolerance=2e-3)
    assert within_bound(near, None) and within_bound(near, 0.0)


class _Stack(torch.nn.Module):
    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False)
                                            for _ in range(layers)))

    def forward(self, x):
        return self.layers(x)


def test_folded_transposes_of_weights_are_views_not_copies():
    """On 3-D input a Linear exports as MatMul(x, Transpose(W)), and the optimizer folds every such
    Transpose into a new initializer (a numpy array, not the module's tensor): on the CPU it is a
    view of the weight, which the count must not take for a copy; a real copy it must count."""
    torch.manual_seed(0)
    module = _Stack(2, 512).to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                    optimize=True)
    raws = [v.const_value.raw for v in program.model.graph.initializers.values()
            if v.const_value.nbytes == 512 * 512 * 2]
    assert len(raws) == 2 and not any(isinstance(r, torch.Tensor) for r in raws)  # folded
    assert copied_initializer_bytes(program, module) == (0, 512 * 512 * 2)
    for layer in module.layers:  # the module's weights elsewhere now: the initializers are copies
        layer.weight.data = layer.weight.data.clone()
    assert copied_initializer_bytes(program, module)[0] == 2 * 512 * 512 * 2


def test_weights_are_saved_one_tensor_at_a_time_and_the_twin_reads_them(tmp_path):
    """Eight 34 MB bf16 weights, saved as external data: saving adds far less host memory than the
    weights (a ModelProto holding them adds 1.5 GB), and the float32 twin is a small graph over the
    same weights file that computes what PyTorch computes in float32, widening a few weights at a
    time (onnxruntime's default order widens all of them first: 0.8 GB here)."""
    torch.manual_seed(0)
    module = _Stack(8, 4096).to(torch.bfloat16).eval()
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    x = torch.randn(2, 4096)
    with torch.no_grad():
        program = torch.onnx.export(module, (x.to(torch.bfloat16),), dynamo=True, input_names=["x"],
                                    output_names=["y"], optimize=True)
    copied, largest = copied_initializer_bytes(program, module)
    assert copied == 0 and largest == 4096 * 4096 * 2
    target = tmp_path / "stack" / "model.onnx"
    with PeakMemory(cuda=False) as meter:
        save_program(program, target, weight_bytes=EXTERNAL_DATA_BYTES + 1)  # as a DiT's
    del program
    added = meter.host_peak - meter.host_start
    print(f"\nsaving {weights / 1e6:.0f} MB of weights added {added / 1e6:.1f} MB of host memory")
    data = target.with_name("model.onnx.data")
    assert data.stat().st_size == weights
    assert added < weights / 3

    twin = write_float32_twin(target)
    assert twin.stat().st_size < 1e6 and not list(tmp_path.glob("stack/*twin*.data"))
    with PeakMemory(cuda=False) as meter:
        got = parity_session(twin, reduced=True).run(None, {"x": x.numpy()})[0]
    added = meter.host_peak - meter.host_start
    print(f"onnxruntime on the float32 twin added {added / 1e6:.1f} MB of host memory")
    # the bf16 weights, and float32 copies of a few at a time (all at once: 3 x the weights)
    assert added < 1.5 * weights
    with torch.no_grad():
        expected = module.float()(x).numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
