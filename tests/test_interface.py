"""`flux_bls`'s public interface is declared once (specs.BLS_INPUTS); the validator, the rendered
config, the client and the README all agree with that declaration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flux_triton.clients.stream_client import NUMPY_DTYPES, build_inputs
from flux_triton.model_info import load_model_info
from flux_triton.request import InvalidRequest, validate_request
from flux_triton.specs import BLS_INPUTS, bls_input

pytestmark = pytest.mark.fast

# A valid value of every input, as a client would pass it to build_inputs.
SAMPLES = {
    "prompt": ["a cat", "a dog"], "prompt_2": "a cat", "negative_prompt": ["blurry", "dark"],
    "negative_prompt_2": "blurry", "height": 64, "width": 96, "num_inference_steps": 3,
    "num_images_per_prompt": 2, "max_sequence_length": 32, "deadline_ms": 5000,
    "guidance_scale": 3.5, "true_cfg_scale": 2.0, "seed": 12345, "sigmas": [1.0, 0.6, 0.3],
    "preview_kind": "both", "lora": ["style", "outline"], "lora_scale": [0.75, 1.5],
    "list_loras": False, "image": np.full((1, 64, 96, 3), 128, np.uint8),
    "mask": np.full((1, 64, 96), 255, np.uint8), "strength": 0.5, "image_role": "init",
    "cache_threshold": 0.1,
}
ADAPTERS = {"style", "outline"}  # what the samples' server is taken to have


def test_every_declared_input_has_a_sample():
    assert set(SAMPLES) == {t.name for t in BLS_INPUTS if not t.replaced_by}


def test_a_retired_input_is_refused_naming_what_to_send(model_dirs):
    with pytest.raises(InvalidRequest, match="send `preview_kind`: `none`") as refused:
        validate_request(_raw({"prompt": "a cat", "previews": False}), load_model_info(model_dirs["dev"]))
    assert refused.value.field == "previews"


def test_validator_accepts_each_declared_input_and_refuses_any_other(model_dirs):
    """Every declared input, alone beside a prompt, validates (the validator knows it); a name
    the interface does not declare is refused, naming it."""
    info = load_model_info(model_dirs["dev"])
    for spec in BLS_INPUTS:
        if spec.name == "prompt" or spec.replaced_by:
            continue
        fields = {"prompt": SAMPLES["prompt"], spec.name: SAMPLES[spec.name]}
        if spec.name == "negative_prompt_2":
            fields["negative_prompt"] = SAMPLES["negative_prompt"]
        if spec.name == "sigmas":
            fields["num_inference_steps"] = len(SAMPLES["sigmas"])
        if spec.name == "lora_scale":
            fields["lora"] = SAMPLES["lora"]
        if spec.name in ("mask", "strength", "image_role"):
            fields["image"] = SAMPLES["image"]
        validate_request(_raw(fields), info, loras=ADAPTERS)  # raises if the input were unknown
    with pytest.raises(InvalidRequest) as refused:
        validate_request(_raw({"prompt": "a cat", "num_steps": 4}), info)
    assert refused.value.field == "num_steps"


def test_client_builds_each_input_as_declared():
    built = {t.name(): t for t in build_inputs(**SAMPLES)}
    for spec in (s for s in BLS_INPUTS if not s.replaced_by):
        tensor = built[spec.name]
        assert tensor.datatype() == spec.dtype, spec.name
        assert len(tensor.shape()) == len(spec.dims), spec.name
        for dim, size in zip(spec.dims, tensor.shape()):
            assert isinstance(dim, str) or dim == size, spec.name


def _raw(fields: dict) -> dict[str, np.ndarray]:
    """Fields as the server receives them: numpy arrays of each input's declared type."""
    raw = {}
    for name, value in fields.items():
        declared = name in {t.name for t in BLS_INPUTS}
        dtype = bls_input(name).dtype if declared else "INT32"
        strings = [value] if isinstance(value, str) else value
        if dtype == "BYTES":
            raw[name] = np.array([s.encode() for s in strings], dtype=object)
        elif declared and len(bls_input(name).dims) > 1:  # images and masks keep their shape
            raw[name] = np.asarray(value, dtype=NUMPY_DTYPES[dtype])
        else:
            raw[name] = np.asarray(value, dtype=NUMPY_DTYPES[dtype]).reshape(-1)
    return raw


def test_what_the_client_sends_validates(model_dirs):
    info = load_model_info(model_dirs["dev"])
    request = validate_request(_raw(SAMPLES), info, loras=ADAPTERS)
    assert request.batch_size == 4 and request.do_true_cfg
    assert request.loras == (("style", 0.75), ("outline", 1.5))
    assert request.preview_kind == "both" and request.strength == 0.5
    assert request.cache_threshold == np.float32(0.1)
    assert (request.height, request.width, request.seed) == (64, 96, 12345)


def test_readme_documents_every_input():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = readme.split("`flux_bls` inputs:")[1].split("The stream:")[0]
    for spec in BLS_INPUTS:
        assert f"`{spec.name}`" in documented, spec.name
