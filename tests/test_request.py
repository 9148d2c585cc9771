"""Defaults and normalisation of requests (errors are covered through the server in test_errors)."""

import json
import shutil

import pytest

from flux_triton.model_info import PIPELINE_DEFAULTS, load_model_info
from flux_triton.request import InvalidRequest, validate_request
from flux_triton.serving_config import ServingLimits
from tests.reference import raw_inputs

pytestmark = pytest.mark.fast  # unit tests: no server


def test_defaults_come_from_the_model_folder(model_dirs):
    info = load_model_info(model_dirs["schnell"])
    serving = json.loads((model_dirs["schnell"] / "flux_serving.json").read_text())
    request = validate_request(raw_inputs(prompt="a cat", seed=3), info)
    assert (request.height, request.width) == (serving["default_height"], serving["default_width"])
    assert request.num_inference_steps == serving["default_num_inference_steps"]
    assert request.max_sequence_length == serving["default_max_sequence_length"]
    assert request.guidance_scale == serving["default_guidance_scale"]
    assert request.prompts_2 == ("a cat",) and request.negative_prompts is None
    assert request.num_images_per_prompt == 1 and request.seed == 3 and not request.do_true_cfg


def test_diffusers_defaults_without_serving_file(model_dirs, tmp_path):
    folder = shutil.copytree(model_dirs["dev"], tmp_path / "dev")
    (folder / "flux_serving.json").unlink()
    request = validate_request(raw_inputs(prompt="a cat"), load_model_info(folder))
    assert request.height == request.width == PIPELINE_DEFAULTS["default_height"] == 1024
    assert request.num_inference_steps == 28 and request.guidance_scale == 3.5
    assert request.max_sequence_length == 512
    assert 0 <= request.seed < 2**63


def test_negative_prompt_broadcast_and_true_cfg(model_dirs):
    info = load_model_info(model_dirs["dev"])
    request = validate_request(
        raw_inputs(prompt=["a", "b", "c"], negative_prompt="blurry", true_cfg_scale=2.0), info)
    assert request.negative_prompts == ("blurry",) * 3 == request.negative_prompts_2
    assert request.do_true_cfg and request.batch_size == 3
    no_cfg = validate_request(raw_inputs(prompt="a", negative_prompt="x", true_cfg_scale=1.0), info)
    assert not no_cfg.do_true_cfg


def test_sigmas_set_the_step_count(model_dirs):
    info = load_model_info(model_dirs["dev"])
    request = validate_request(raw_inputs(prompt="a", sigmas=[1.0, 0.6, 0.3]), info)
    assert request.num_inference_steps == 3 and len(request.sigmas) == 3


def test_limits_are_configurable(model_dirs):
    info = load_model_info(model_dirs["schnell"])
    limits = ServingLimits(max_height=256, max_width=256, max_batch=4)
    with pytest.raises(InvalidRequest) as error:
        validate_request(raw_inputs(prompt="a", height=512), info, limits)
    assert error.value.field == "height" and "[16, 256]" in str(error.value)
    with pytest.raises(InvalidRequest) as error:
        validate_request(raw_inputs(prompt=["a", "b"], num_images_per_prompt=3), info, limits)
    assert error.value.field == "num_images_per_prompt" and "[1, 2]" in str(error.value)


def test_unsupported_scheduler_is_refused(model_dirs, tmp_path):
    folder = shutil.copytree(model_dirs["schnell"], tmp_path / "karras")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, use_karras_sigmas=True)))
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        load_model_info(folder)


def test_work_per_request_is_bounded(model_dirs):
    """height × width × steps × images over max_pixel_steps is refused, naming every factor."""
    info = load_model_info(model_dirs["schnell"])
    limits = ServingLimits(max_pixel_steps=64 * 64 * 10 * 4)
    validate_request(raw_inputs(prompt="a", height=64, width=64, num_inference_steps=10,
                                num_images_per_prompt=4), info, limits)  # exactly at the cap
    with pytest.raises(InvalidRequest) as error:
        validate_request(raw_inputs(prompt=["a", "b"], height=64, width=64, num_inference_steps=10,
                                    num_images_per_prompt=3), info, limits)
    message = str(error.value)
    assert error.value.field == "num_inference_steps"
    for named in ("height", "width", "num_inference_steps", "num_images_per_prompt",
                  "64 × 64 × 10 × 6 = 245760", f"max_pixel_steps {64 * 64 * 10 * 4}"):
        assert named in message, message
    # the default cap refuses what the single limits alone allowed: 16 images of 2048² at 100 steps
    with pytest.raises(InvalidRequest, match="max_pixel_steps"):
        validate_request(raw_inputs(prompt="a", height=2048, width=2048, num_inference_steps=100,
                                    num_images_per_prompt=16), info)
