"""The exported ONNX graphs: parity table at export, and the served ONNX pipeline against diffusers."""

import json

import numpy as np
import onnx
import pytest
import torch

from flux_triton.export.onnx_export import (
    CHECK_SIZES,
    EXPORT_SIZES,
    NETWORKS,
    TOLERANCE,
    ExportError,
    export_all,
    onnx_paths,
)
from flux_triton.export.repository import main as export_main
from flux_triton.request import validate_request
from flux_triton.runtime.onnx_components import OnnxComponent
from flux_triton.runtime.torch_components import load_component
from flux_triton.specs import component_specs
from tests.reference import PARITY_CASES, diffusers_image, parity_fields, raw_inputs, served_generate
from tests.test_image_inputs import EDITS, diffusers_edit, edit_inputs, served_edit


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_served_onnx_within_one_level_of_diffusers(served_onnx, diffusers_pipes, variant, case):
    fields = parity_fields(case, variant)
    srv = served_onnx[variant]
    result = served_generate(srv, fields)
    assert result.error is None, result.error
    assert result.kinds[-2:] == ["image", "final"]
    request = validate_request(raw_inputs(**fields), srv.info)
    expected, _, _ = diffusers_image(diffusers_pipes[variant], request)
    diff = np.abs(result.image.astype(int) - expected.astype(int))
    print(f"\nonnx parity {variant} / {case}: uint8 max diff {diff.max()}, "
          f"pixels differing {np.count_nonzero(diff)}/{diff.size}")
    assert diff.max() <= 1


def test_export_report_and_graphs(served_onnx):
    """The served repository holds checked graphs with the spec's names and dynamic axes."""
    srv = served_onnx["dev"]
    repo = srv.server.repository
    report = json.loads((repo / "export_report.json").read_text())
    specs = component_specs(srv.info)
    for name in NETWORKS:
        diffs = report["components"][name]["max_abs_diff"]
        assert len(diffs) == len(CHECK_SIZES) and max(diffs) < 1e-4, (name, diffs)
        graph = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False).graph
        assert [i.name for i in graph.input] == [t.name for t in specs[name].inputs]
        assert [o.name for o in graph.output] == [t.name for t in specs[name].outputs]
        for tensor, spec in zip(graph.input, specs[name].inputs):
            dims = tensor.type.tensor_type.shape.dim
            symbolic = [isinstance(d, str) for d in spec.dims]
            assert [bool(d.dim_param) for d in dims] == symbolic, (name, tensor.name)


@pytest.mark.parametrize("variant, case", [("schnell", "img2img, an image per prompt, resized"),
                                           ("dev", "inpaint, 2 images per prompt")])
def test_served_onnx_edits_within_one_level_of_diffusers(served_onnx, model_dirs, variant, case):
    """Image-to-image and inpainting through the vae_encoder graph (and the others) served by
    onnxruntime: within one uint8 level of diffusers' FluxImg2Img / FluxInpaint pipelines."""
    srv = served_onnx[variant]
    fields, shape, with_mask = EDITS[case]
    raw = edit_inputs(fields, shape, with_mask, variant)
    result = served_edit(srv, raw)
    assert result.error is None, result.error
    assert "vae_encoder" in result.timings
    expected, _ = diffusers_edit(model_dirs[variant], validate_request(raw, srv.info))
    diff = np.abs(result.image.astype(int) - expected.astype(int))
    print(f"\nonnx edit parity {variant} / {case}: uint8 max diff {diff.max()}, "
          f"pixels differing {np.count_nonzero(diff)}/{diff.size}")
    assert result.image.shape == expected.shape and diff.max() <= 1


def test_vae_encoder_graph_through_its_dynamic_axes(served_onnx):
    """The served vae_encoder graph at sizes it was neither traced nor checked at equals PyTorch,
    with the posterior's noise: zeros give diffusers' latent_dist.mean, a draw adds std * noise,
    both shifted and scaled as FluxImg2ImgPipeline._encode_vae_image does."""
    srv = served_onnx["dev"]
    info = srv.info
    graph = OnnxComponent(srv.server.repository / "vae_encoder" / "1" / "model.onnx",
                          component_specs(info)["vae_encoder"])
    encoder = load_component("vae_encoder", info)
    scale = info.vae_scale_factor
    traced_or_checked = {(s["H_lat"], s["W_lat"]) for s in (EXPORT_SIZES, *CHECK_SIZES)}
    gen = torch.Generator().manual_seed(5)
    for batch, lat_h, lat_w in ((2, 6, 10), (1, 14, 4)):
        assert (lat_h, lat_w) not in traced_or_checked
        image = torch.rand(batch, 3, lat_h * scale, lat_w * scale, generator=gen) * 2 - 1
        noise = torch.randn(batch, info.latent_channels, lat_h, lat_w, generator=gen)
        with torch.no_grad():
            posterior = encoder.model.encode(image).latent_dist
            mean = (posterior.mean - info.vae_shift_factor) * info.vae_scaling_factor
            spread = posterior.std * noise * info.vae_scaling_factor
            expected = encoder(image=image, noise=noise)["latents"]
        drawn = graph(image=image, noise=noise)["latents"]
        at_mean = graph(image=image, noise=torch.zeros_like(noise))["latents"]
        assert drawn.shape == at_mean.shape == (batch, info.latent_channels, lat_h, lat_w)
        diffs = [float((drawn - expected).abs().max()), float((at_mean - mean).abs().max()),
                 float((drawn - at_mean - spread).abs().max())]
        print(f"\nvae_encoder {list(image.shape)}: max abs diffs (draw, mean, std * noise) {diffs}")
        assert max(diffs) <= TOLERANCE["vae_encoder"]
        assert float(spread.abs().max()) > 100 * TOLERANCE["vae_encoder"]  # the noise counts


def test_parity_failure_stops_the_export(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TOLERANCE, "vae_decoder", 0.0)
    with pytest.raises(ExportError, match=r"vae_decoder"):
        export_all(model_dirs["schnell"], {"vae_decoder": onnx_paths(tmp_path)["vae_decoder"]},
                   tmp_path / "report.json")
    assert "FAIL" in capsys.readouterr().out


def test_tensorrt_export_fails_fast_without_tensorrt(model_dirs, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code = export_main(["--backend", "tensorrt", "--model-dir", str(model_dirs["schnell"]),
                        "--repository", str(tmp_path / "repo"), "--onnx-dir", str(tmp_path / "onnx")])
    assert code == 1
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() and not (tmp_path / "onnx").exists()

