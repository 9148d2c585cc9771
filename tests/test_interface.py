"""`flux_bls`'s public interface is declared once (specs.BLS_INPUTS); the validator, the rendered
config, the client and the README all agree with that declaration."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from flux_triton import request as request_module
from flux_triton.clients.stream_client import NUMPY_DTYPES, build_inputs
from flux_triton.export.repository import render_configs
from flux_triton.model_info import load_model_info
from flux_triton.request import validate_request
from flux_triton.specs import BLS_INPUTS, bls_spec

pytestmark = pytest.mark.fast

# A valid value of every input, as a client would pass it to build_inputs.
SAMPLES = {
    "prompt": ["a cat", "a dog"], "prompt_2": "a cat", "negative_prompt": ["blurry", "dark"],
    "negative_prompt_2": "blurry", "height": 64, "width": 96, "num_inference_steps": 3,
    "num_images_per_prompt": 2, "max_sequence_length": 32, "deadline_ms": 5000,
    "guidance_scale": 3.5, "true_cfg_scale": 2.0, "seed": 12345, "sigmas": [1.0, 0.6, 0.3],
    "previews": False, "preview_kind": "both",
}


def test_every_declared_input_has_a_sample():
    assert set(SAMPLES) == {t.name for t in BLS_INPUTS}


def test_validator_accepts_exactly_the_declared_inputs():
    assert request_module.KNOWN_FIELDS == {t.name for t in BLS_INPUTS}
    assert set(request_module.STRING_FIELDS) == {t.name for t in BLS_INPUTS
                                                  if t.dtype == "BYTES" and t.dims == ("N",)}


def test_client_builds_each_input_as_declared():
    built = {t.name(): t for t in build_inputs(**SAMPLES)}
    for spec in BLS_INPUTS:
        tensor = built[spec.name]
        assert tensor.datatype() == spec.dtype, spec.name
        assert len(tensor.shape()) == len(spec.dims), spec.name
        for dim, size in zip(spec.dims, tensor.shape()):
            assert isinstance(dim, str) or dim == size, spec.name


def test_what_the_client_sends_validates(model_dirs):
    info = load_model_info(model_dirs["dev"])
    raw = {}
    for spec in BLS_INPUTS:
        value = SAMPLES[spec.name]
        strings = [value] if isinstance(value, str) else value
        raw[spec.name] = (np.array([s.encode() for s in strings], dtype=object)
                          if spec.dtype == "BYTES"
                          else np.asarray(value, dtype=NUMPY_DTYPES[spec.dtype]).reshape(-1))
    request = validate_request(raw, info)
    assert request.batch_size == 4 and request.do_true_cfg and request.previews is False
    assert request.preview_kind == "both"
    assert (request.height, request.width, request.seed) == (64, 96, 12345)


def test_rendered_config_declares_the_same_inputs(model_dirs):
    config = render_configs(model_dirs["schnell"])["flux_bls"]
    rendered = re.findall(r'name: "(\w+)"\n    data_type: TYPE_(\w+)\n    dims: \[ ([^\]]*) \]'
                          r'(\n    optional: true)?', config.split("output [")[0])
    expected = [(t.name, "STRING" if t.dtype == "BYTES" else t.dtype,
                 ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.dims), t.optional)
                for t in bls_spec(load_model_info(model_dirs["schnell"])).inputs]
    assert [(n, d, dims, bool(o)) for n, d, dims, o in rendered] == expected


def test_readme_documents_every_input():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = readme.split("`flux_bls` inputs:")[1].split("The stream:")[0]
    for spec in BLS_INPUTS:
        assert f"`{spec.name}`" in documented, spec.name
