"""Static FP8 scales (FP8_SCALES=static): the float8 layer against the FP8 ONNX graphs' Q/DQ layer,
the calibration through the pipeline, its file and what a hostile one gets, the trained model's
images in static FP8 with and without a LoRA adapter, and the export's options."""

import json
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
    quantize_static,
    read_calibration,
    write_calibration,
)
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.runtime.loras import AdapterSwitch, MergedAdapters
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
    for what, text in hostile.items():
        path.write_text(text)
        with pytest.raises(ValueError, match="FP8 calibration"):
            read_calibration(path)
    with pytest.raises(ValueError, match="cannot read the FP8 calibration"):
        read_calibration(tmp_path / "missing.json")
    partial = dict(list(amax.items())[1:])
    with pytest.raises(ValueError, match="another model"):
        quantize_static(models.parts["dit_transformer"].model, partial, names)
    with pytest.raises(ValueError, match="precision FP8"):
        Acceleration("BF16", fp8_calibration=str(path))
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(_write(tmp_path / "empty.txt", "\n  \n"))


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


def test_trained_model_in_static_fp8_with_and_without_an_adapter():
    """The trained model's images in static FP8 stay near its float32 ones, with the `outline`
    adapter merged into the float8 weights too, and unmerging restores them bit for bit."""
    info = load_model_info(SHAPES_DIR)
    catalog = read_catalog(SHAPES_DIR / "loras")
    reference = TorchFluxModels(info, loras=catalog)  # float32, the adapter as peft layers
    plain, outlined = _images(info, reference, 5), _images(info, reference, 5, (("outline", 1.0),))

    models = TorchFluxModels(info)
    dit = models.parts["dit_transformer"].model
    merged = MergedAdapters(dit, "transformer", catalog)  # before quantizing, as the loader does
    amax, _ = calibrate_dit(info, "cpu", CAPTIONS, models)
    names = token_linear_names(dit)
    assert quantize_static(dit, amax, names) == len(names)
    merged.prepare_slots(2)
    first = {name: dit.get_submodule(name).weight_data.clone() for name in names}
    models.adapters = {"dit_transformer": merged,  # CLIP as the float32 reference has it
                       "clip_encoder": AdapterSwitch(models.parts["clip_encoder"].model,
                                                     "text_encoder", catalog)}
    static_plain = _images(info, models, 5)
    static_outlined = _images(info, models, 5, (("outline", 1.0),))
    back = _images(info, models, 5)
    print(f"\nstatic FP8 against float32: {_psnr(static_plain, plain):.1f} dB, with the adapter "
          f"{_psnr(static_outlined, outlined):.1f} dB; the adapter's own effect "
          f"{_psnr(outlined, plain):.1f} dB")
    assert _psnr(static_plain, plain) > 28 and _psnr(static_outlined, outlined) > 28
    assert _psnr(static_outlined, outlined) > _psnr(outlined, plain) + 3  # the adapter took effect
    assert np.array_equal(back, static_plain)
    assert all(torch.equal(dit.get_submodule(name).weight_data, first[name]) for name in names)


def test_fp8_scales_reach_the_dit_alone_and_need_fp8(model_dirs, tmp_path):
    from flux_triton.adapters.components import acceleration_options
    from flux_triton.export.repository import main, render_repository

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
    dynamic = render_repository(model_dirs["schnell"], device="gpu", precision="FP8", repository=dest)
    assert dynamic.options["dit_transformer"].fp8_calibration is None
    assert main(["--model-dir", str(model_dirs["schnell"]), "--repository", str(dest),
                 "--fp8-scales", "static"]) == 1  # FP32 on the CPU: refused, naming the fix
