"""The exported ONNX graphs: parity table at export, and the served ONNX pipeline against diffusers."""

import json

import numpy as np
import onnx
import pytest

from flux_triton.export.onnx_export import (
    CHECK_SIZES,
    NETWORKS,
    TOLERANCE,
    ExportError,
    export_all,
    onnx_paths,
)
from flux_triton.export.repository import main as export_main
from flux_triton.request import validate_request
from flux_triton.specs import component_specs
from tests.reference import PARITY_CASES, diffusers_image, parity_fields, raw_inputs, served_generate


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

