"""Invalid inputs get an INVALID_ARG error naming the field; the server keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.reference import served_generate

VALID = dict(prompt=["a cat"], height=64, width=64, num_inference_steps=2, seed=1)

# (fields replacing VALID ones, field named in the error, text of the allowed range)
INVALID = {
    "empty prompt": (dict(prompt=[]), "prompt", "at least one string"),
    "height not a multiple": (dict(height=100), "height", "multiple of 16"),
    "height too small": (dict(height=8), "height", "[16, 2048]"),
    "width too large": (dict(width=4096), "width", "[16, 2048]"),
    "zero steps": (dict(num_inference_steps=0), "num_inference_steps", "[1, 100]"),
    "too many steps": (dict(num_inference_steps=101), "num_inference_steps", "[1, 100]"),
    "zero images": (dict(num_images_per_prompt=0), "num_images_per_prompt", "[1, 16]"),
    "batch too large": (dict(num_images_per_prompt=17), "num_images_per_prompt", "[1, 16]"),
    "sequence too long": (dict(max_sequence_length=513), "max_sequence_length", "[1, 512]"),
    "sequence empty": (dict(max_sequence_length=0), "max_sequence_length", "[1, 512]"),
    "guidance NaN": (dict(guidance_scale=float("nan")), "guidance_scale", "[0.0, 100.0]"),
    "guidance negative": (dict(guidance_scale=-1.0), "guidance_scale", "[0.0, 100.0]"),
    "true cfg infinite": (dict(true_cfg_scale=float("inf")), "true_cfg_scale", "[0.0, 100.0]"),
    "seed negative": (dict(seed=-1), "seed", "[0, 9223372036854775807]"),
    "sigmas empty": (dict(sigmas=[], num_inference_steps=None), "sigmas", "1 to 100 values"),
    "sigmas rising": (dict(sigmas=[0.5, 0.9], num_inference_steps=None), "sigmas", "non-increasing"),
    "sigma zero": (dict(sigmas=[1.0, 0.0], num_inference_steps=None), "sigmas", "(0, 1]"),
    "sigma NaN": (dict(sigmas=[1.0, float("nan")], num_inference_steps=None), "sigmas", "(0, 1]"),
    "steps vs sigmas": (dict(sigmas=[1.0, 0.5, 0.2]), "num_inference_steps", "number of `sigmas` (3)"),
    "negative count": (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt",
                       "1 or 2 strings"),
    "prompt_2 count": (dict(prompt_2=["x", "y"]), "prompt_2", "1 or 1 strings"),
    "negative_2 alone": (dict(negative_prompt_2=["x"]), "negative_prompt_2", "needs `negative_prompt`"),
    "prompt too long": (dict(prompt=["a" * 5000]), "prompt", "at most 4096 characters"),
}


def _stream(served, fields: dict, extra: list = ()):
    """VALID with `fields` over it (None removes a field), plus raw `extra` inputs."""
    merged = {k: v for k, v in {**VALID, **fields}.items() if v is not None}
    return served_generate(served, merged, timeout_s=60, extra_inputs=extra)


def _http_generate_stream(served, body: dict) -> tuple[int, str]:
    port = served.server.http_port
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/flux_bls/generate_stream",
        data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_names_field(served, case):
    fields, field, allowed = INVALID[case]
    result = _stream(served["schnell"], fields)
    assert result.kinds == ["error"], result.kinds
    assert f"`{field}`" in result.error and allowed in result.error, result.error


@pytest.mark.parametrize("case", ["height not a multiple", "sigmas rising", "seed negative"])
def test_invalid_input_is_invalid_arg_status(served, case):
    """gRPC streams carry only the message; Triton's HTTP generate_stream maps INVALID_ARG to 400."""
    fields, field, _ = INVALID[case]
    body = {k: (v if isinstance(v, list) else [v])
            for k, v in {**VALID, **fields}.items() if v is not None}
    status, text = _http_generate_stream(served["schnell"], body)
    assert status == 400 and f"`{field}`" in text, (status, text)


def _raw_input(name: str, array: np.ndarray, triton_type: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), triton_type)
    tensor.set_data_from_numpy(array)
    return tensor


def test_triton_rejects_bad_types_shapes_and_names(served):
    srv = served["schnell"]
    bad_utf8 = _stream(srv, dict(prompt=None),
                       [_raw_input("prompt", np.array([b"\xff\xfe"], dtype=object), "BYTES")])
    assert "`prompt`" in bad_utf8.error and "UTF-8" in bad_utf8.error
    wrong_type = _stream(srv, dict(height=None),
                         [_raw_input("height", np.array([64.0], dtype=np.float32), "FP32")])
    assert "'height'" in wrong_type.error and "expects 'INT32'" in wrong_type.error
    wrong_shape = _stream(srv, dict(height=None),
                          [_raw_input("height", np.array([64, 64], dtype=np.int32), "INT32")])
    assert "height" in wrong_shape.error and "shape" in wrong_shape.error
    unknown = _stream(srv, {}, [_raw_input("bogus", np.array([1], dtype=np.int32), "INT32")])
    assert "'bogus'" in unknown.error
    missing = _stream(srv, dict(prompt=None))
    assert "prompt" in missing.error


def test_server_keeps_serving_after_bad_requests(served):
    srv = served["schnell"]
    for case in ("height not a multiple", "sigma NaN", "negative count"):
        assert _stream(srv, INVALID[case][0]).error is not None
        good = _stream(srv, {})
        assert good.error is None and good.kinds == ["step", "step", "image", "final"]
    assert srv.server.is_ready()
