"""Static FP8 scales (FP8_SCALES=static): the float8 layer against the FP8 ONNX graphs' Q/DQ layer,
the calibration through the pipeline, its file and what a hostile one gets, the trained model's
images in static FP8 with and without a LoRA adapter, and the export's options."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flux_triton.export.calibration import calibrate_dit, read_prompts
from flux_triton.export.quantization import Fp8Linear
from flux_triton.loras import read_catalog
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import validate_request
from flux_triton.runtime.acceleration import Acceleration, token_linear_names
from flux_triton.runtime.float8 import (
    FLOAT8_MAX,
    StaticFloat8Linear,
    calibrate_input_amax,
    quantize_static,
    read_calibration,
    write_calibration,
)
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import FP8_CALIBRATION_FILE

SHAPES_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-flux"
CAPTIONS = ("a red circle on a blue background", "a yellow square on a green background")


def test_the_static_layer_computes_what_the_onnx_qdq_layer_does():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96) * 2
    amax = 3.0  # below the inputs' largest magnitude: those saturate, in both alike
    assert float(x.abs().max()) > amax
    static, qdq = StaticFloat8Linear(linear, amax), Fp8Linear(linear, amax)
    with torch.no_grad():
        got, expected = static(x), qdq(x)
    assert got.shape == (3, 7, 40) and got.dtype == torch.float32
    # the same float8 values on both sides; only the order of the sums differs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert float(static.input_scale) == pytest.approx(amax / FLOAT8_MAX)
    with torch.no_grad():
        exact = linear(x)
    assert float((got - exact).abs().max()) > 1e-3  # it did quantize


def test_a_calibration_covers_every_float8_layer_and_hostile_files_are_refused(model_dirs, tmp_path):
    info = load_model_info(model_dirs["schnell"])
    amax, about = calibrate_dit(info, "cpu", read_prompts(None)[:2])
    models = TorchFluxModels(info)
    names = token_linear_names(models.parts["dit_transformer"].model)
    assert sorted(amax) == sorted(names) and all(value > 0 for value in amax.values())
    assert about["layers"] == len(names) and about["num_inference_steps"] == info.default_num_inference_steps
    path = tmp_path / FP8_CALIBRATION_FILE
    write_calibration(path, amax, about)
    assert read_calibration(path) == amax
    hostile = {"not json": "{", "a list": "[1, 2]", "no version": json.dumps({"input_amax": {}}),
               "a string": json.dumps({"version": 1, "input_amax": {"a": "1"}}),
               "negative": json.dumps({"version": 1, "input_amax": {"a": -1}}),
               "a flag": json.dumps({"version": 1, "input_amax": {"a": True}}),
               "infinite": '{"version": 1, "input_amax": {"a": Infinity}}',
               "not a number": '{"version": 1, "input_amax": {"a": NaN}}'}
    for text in hostile.values():
        path.write_text(text)
        with pytest.raises(ValueError, match="FP8 calibration"):
            read_calibration(path)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inputs = [torch.ones(1, 4), torch.full((1, 4), float("nan")), torch.ones(1, 4) * 3]
    seen = calibrate_input_amax(layer, ["0"], lambda: [layer(x) for x in inputs])
    assert np.isnan(seen["0"])  # kept, whatever came after it
    for overflowed in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="not finite .* 'x'"):
            write_calibration(tmp_path / "overflowed.json", {"x": overflowed}, about)
    with pytest.raises(ValueError, match="cannot read the FP8 calibration"):
        read_calibration(tmp_path / "missing.json")
    partial = dict(list(amax.items())[1:])
    with pytest.raises(ValueError, match="another model"):
        quantize_static(models.parts["dit_transformer"].model, partial, names)
    with pytest.raises(ValueError, match="precision FP8"):
        Acceleration("BF16", fp8_calibration=str(path))
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(_write(tmp_path / "empty.txt", "\n  \n"))
    with pytest.raises(ValueError, match="cannot read"):
        read_prompts(tmp_path / "absent.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read"):
        read_prompts(tmp_path / "binary.txt")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _images(info, models, seed: int, loras=()) -> np.ndarray:
    inputs = {"prompt": np.array([c.encode() for c in CAPTIONS], dtype=object),
              "seed": np.array([seed], dtype=np.uint64)}
    if loras:
        inputs["lora"] = np.array([name.encode() for name, _ in loras], dtype=object)
        inputs["lora_scale"] = np.array([scale for _, scale in loras], dtype=np.float32)
    request = validate_request(inputs, info, loras=[name for name, _ in loras])
    final = [e for e in run_in_process(request, info, models) if isinstance(e, FinalImage)][-1]
    return final.image.cpu().numpy().astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12)))


@pytest.fixture(scope="module")
def shapes_reference():
    """The trained model's float32 images of CAPTIONS, seed 5, plain and with `outline` (peft)."""
    info = load_model_info(SHAPES_DIR)
    reference = TorchFluxModels(info, loras=read_catalog(SHAPES_DIR / "loras"))
    return _images(info, reference, 5), _images(info, reference, 5, (("outline", 1.0),))


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate", "fused-qkv"])
def test_trained_model_in_static_fp8_with_and_without_an_adapter(tmp_path, shapes_reference,
                                                                 fuse_qkv):
    """The trained model loaded as the server loads it with FP8_SCALES=static (bf16, the DiT's
    layers in float8, the adapter merged into the float8 weights; with FUSE_QKV=1 into rows of
    the fused projections) stays near its float32 images, with and without the `outline`
    adapter; unmerging restores the weights bit for bit."""
    info = load_model_info(SHAPES_DIR)
    catalog = read_catalog(SHAPES_DIR / "loras")
    plain, outlined = shapes_reference
    amax, about = calibrate_dit(info, "cpu", CAPTIONS)
    path = tmp_path / FP8_CALIBRATION_FILE
    write_calibration(path, amax, about)
    acceleration = Acceleration("FP8", fp8_calibration=str(path), fuse_qkv=fuse_qkv)
    models = TorchFluxModels(info, "cpu", acceleration=acceleration, loras=catalog)
    dit = models.adapters["dit_transformer"].module
    names = [name for name, module in dit.named_modules() if isinstance(module, StaticFloat8Linear)]
    assert not token_linear_names(dit)  # every one is float8 now
    fused = [name for name in names if name.endswith(("to_qkv", "to_added_qkv"))]
    # the calibration is the unfused model's: a fused layer takes its three layers' one input
    assert len(names) == (len(amax) - 2 * len(fused) if fuse_qkv else len(amax))
    assert bool(fused) == fuse_qkv
    for name in fused:
        first = name.replace("to_qkv", "to_q").replace("to_added_qkv", "add_q_proj")
        assert float(dit.get_submodule(name).input_scale) == pytest.approx(amax[first] / FLOAT8_MAX)
    first = {name: dit.get_submodule(name).weight_data.clone() for name in names}
    static_plain = _images(info, models, 5)
    static_outlined = _images(info, models, 5, (("outline", 1.0),))
    back = _images(info, models, 5)
    print(f"\nstatic FP8 (bf16) against float32: {_psnr(static_plain, plain):.1f} dB, with the "
          f"adapter {_psnr(static_outlined, outlined):.1f} dB; the adapter's own effect "
          f"{_psnr(outlined, plain):.1f} dB")
    assert _psnr(static_plain, plain) > 28 and _psnr(static_outlined, outlined) > 28
    assert _psnr(static_outlined, outlined) > _psnr(outlined, plain) + 3  # the adapter took effect
    assert np.array_equal(back, static_plain)
    assert all(torch.equal(dit.get_submodule(name).weight_data, first[name]) for name in names)


def test_fp8_scales_and_fused_projections_reach_the_dit_alone(model_dirs, tmp_path):
    from flux_triton.adapters.components import acceleration_options
    from flux_triton.export.repository import main, render_repository, write_repository

    with pytest.raises(ValueError, match="PRECISION=FP8"):
        render_repository(model_dirs["schnell"], device="gpu", precision="BF16", fp8_scales="static")
    with pytest.raises(ValueError, match="FP8_SCALES must be one of"):
        render_repository(model_dirs["schnell"], device="gpu", precision="FP8", fp8_scales="per-row")
    dest = tmp_path / "repo"
    rendered = render_repository(model_dirs["schnell"], device="gpu", precision="FP8",
                                 fp8_scales="static", repository=dest)
    calibrations = {name: getattr(options, "fp8_calibration", None)
                    for name, options in rendered.options.items()}
    assert calibrations.pop("dit_transformer") == FP8_CALIBRATION_FILE
    assert not any(calibrations.values())
    acceleration = acceleration_options({"model_repository": str(dest / "dit_transformer")},
                                        rendered.options["dit_transformer"])
    assert acceleration.fp8_calibration == str(dest / FP8_CALIBRATION_FILE)
    assert acceleration.precision == "FP8"
    written = write_repository(model_dirs["schnell"], dest, device="gpu", precision="FP8",
                               fp8_scales="static", precompile=False,
                               calibration_prompts=_write(tmp_path / "prompts.txt", "a cat\n\na dog\n"))
    calibration = json.loads((written / FP8_CALIBRATION_FILE).read_text())  # made on this CPU
    assert calibration["about"]["prompts"] == ["a cat", "a dog"]
    assert sorted(read_calibration(written / FP8_CALIBRATION_FILE)) == sorted(
        token_linear_names(TorchFluxModels(load_model_info(model_dirs["schnell"]))
                           .parts["dit_transformer"].model))
    assert FP8_CALIBRATION_FILE in (written / "dit_transformer" / "config.pbtxt").read_text()
    dynamic = render_repository(model_dirs["schnell"], device="gpu", precision="FP8", repository=dest)
    assert dynamic.options["dit_transformer"].fp8_calibration is None
    assert main(["--model-dir", str(model_dirs["schnell"]), "--repository", str(dest),
                 "--fp8-scales", "static"]) == 1  # FP32 on the CPU: refused, naming the fix
    fused = render_repository(model_dirs["schnell"], fuse_qkv=True, repository=dest)
    assert [name for name, options in fused.options.items() if getattr(options, "fuse_qkv", False)] \
        == ["dit_transformer"]
    assert acceleration_options({"model_repository": str(dest / "dit_transformer")},
                                fused.options["dit_transformer"]).fuse_qkv
    for refused in (dict(backend="onnx"), dict(sequence_parallel=2)):
        with pytest.raises(ValueError, match="FUSE_QKV=1"):
            render_repository(model_dirs["schnell"], fuse_qkv=True, repository=dest, **refused)


def test_fused_projections_keep_the_images_and_take_adapters_in_their_rows(shapes_reference):
    """FUSE_QKV=1 in float32 on the CPU: one Linear per attention for query, key and value, the
    separate layers gone, the `outline` adapter merged into the fused rows; the images stay
    those of the separate layers with the adapter as peft layers."""
    info = load_model_info(SHAPES_DIR)
    plain, outlined = shapes_reference
    models = TorchFluxModels(info, "cpu", acceleration=Acceleration("FP32", fuse_qkv=True),
                             loras=read_catalog(SHAPES_DIR / "loras"))
    merged = models.adapters["dit_transformer"]
    layers = dict(merged.module.named_modules())
    assert not any(name.endswith((".to_q", ".add_q_proj")) for name in layers)
    assert merged.moved and all(fused in layers for fused, _, _ in merged.moved.values())
    fused_plain = _images(info, models, 5)
    fused_outlined = _images(info, models, 5, (("outline", 1.0),))
    print(f"\nfused projections against separate: {_psnr(fused_plain, plain):.1f} dB, with the "
          f"adapter {_psnr(fused_outlined, outlined):.1f} dB")
    assert _psnr(fused_plain, plain) > 50 and _psnr(fused_outlined, outlined) > 50
    assert np.array_equal(_images(info, models, 5), fused_plain)


def test_precision_labels_name_the_levers():
    from devtools.shapes_accuracy import parse_label

    cases = {"FP8": ("FP8", False, False), "FP8-static": ("FP8", True, False),
             "FP8+qkv": ("FP8", False, True), "FP8-static+qkv": ("FP8", True, True),
             "BF16+qkv": ("BF16", False, True)}
    for label, expected in cases.items():
        assert parse_label(label) == expected, label


def test_served_fused_projections_give_the_unfused_image(model_dirs, tmp_path_factory):
    """FUSE_QKV=1 through the export and the served DiT (CPU, float32): the very image of the
    separate projections in-process."""
    from tests.conftest import _serve_variants
    from tests.reference import raw_inputs, served_generate

    fields = dict(prompt="a red circle", height=64, width=64, seed=4, max_sequence_length=32)
    info = load_model_info(model_dirs["dev"])
    separate = list(run_in_process(validate_request(raw_inputs(**fields), info), info,
                                   TorchFluxModels(info)))[-1].image.numpy()
    for servers in _serve_variants(model_dirs, tmp_path_factory, "torch", ("dev",), fuse_qkv=True):
        served = served_generate(servers["dev"], fields)
        assert served.error is None, served.error
        assert np.array_equal(served.image, separate)
        log = Path(servers["dev"].server.log_file).read_text(errors="replace")
        fused = re.search(r"dit_transformer ready on cpu: .*'fused_projections': (\d+)", log)
        assert fused and int(fused.group(1)) > 0, "the served DiT has no fused projections"


def test_static_fp8_with_fused_projections_compiles_in_full_graphs(model_dirs, tmp_path):
    """The DiT's blocks compile with fullgraph=True (as on the GPU) with both levers on, so a
    graph break in them fails here rather than on a GPU machine; compiled ≈ eager (bf16)."""
    from torch._dynamo.utils import counters

    from flux_triton.runtime.acceleration import load_network, sample_inputs
    from flux_triton.specs import ServingShape

    info = load_model_info(model_dirs["schnell"])
    amax, about = calibrate_dit(info, "cpu", ["a cat"])
    path = tmp_path / FP8_CALIBRATION_FILE
    write_calibration(path, amax, about)
    shape = ServingShape(1, info.default_height, info.default_width, info.default_max_sequence_length)
    levers = dict(fp8_calibration=str(path), fuse_qkv=True)
    eager = load_network("dit_transformer", info, "cpu", Acceleration("FP8", **levers)).run
    settings = ("automatic_dynamic_shapes", "recompile_limit")  # the loader sets them
    saved = {name: getattr(torch._dynamo.config, name) for name in settings}
    torch._dynamo.reset()
    breaks = sum(counters["graph_break"].values())
    try:
        compiled = load_network("dit_transformer", info, "cpu",
                                Acceleration("FP8", compile=True, **levers), warmup=(shape,)).run
        inputs = sample_inputs("dit_transformer", info, shape, "cpu", "FP8")
        with torch.inference_mode():
            expected, got = eager(**inputs)["noise_pred"], compiled(**inputs)["noise_pred"]
    finally:
        for name, value in saved.items():
            setattr(torch._dynamo.config, name, value)
        torch._dynamo.reset()
    assert sum(counters["graph_break"].values()) == breaks
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
