"""The fast tier: `cache_threshold` runs diffusers' first-block cache (FirstBlockCacheConfig) with
its state carried per request, bit-equal to diffusers on the CPU, in-process and served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage, StepUpdate
from flux_triton.request import InvalidRequest, validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from tests.reference import diffusers_image, first_block_cache, raw_inputs, served_generate

SHAPES_DIR = "models/shapes-flux"
PROMPT = "a red circle on a blue background"
# (variant, fields): thresholds at which these models skip some steps and run others
CASES = {
    "schnell, 2 prompts x 2 images": ("schnell", dict(
        prompt=[PROMPT, "a photo of a cat"], num_images_per_prompt=2, num_inference_steps=8,
        seed=3, cache_threshold=0.5)),
    "dev, true CFG (the negative prompt's calls cached apart)": ("dev", dict(
        prompt=PROMPT, negative_prompt="blurry", true_cfg_scale=2.0, guidance_scale=4.0,
        num_inference_steps=8, seed=5, cache_threshold=0.5)),
    "shapes model": ("shapes", dict(prompt=PROMPT, num_inference_steps=12, seed=1,
                                    cache_threshold=0.2)),
}


def model_dir(model_dirs, variant: str):
    return SHAPES_DIR if variant == "shapes" else model_dirs[variant]


@pytest.fixture(scope="module")
def pipes(model_dirs):
    from diffusers import FluxPipeline

    return {v: FluxPipeline.from_pretrained(model_dir(model_dirs, v), dtype=torch.float32)
            for v in ("schnell", "dev", "shapes")}


@pytest.mark.parametrize("case", list(CASES))
def test_in_process_cache_equals_diffusers_first_block_cache(model_dirs, pipes, case):
    variant, fields = CASES[case]
    info = load_model_info(model_dir(model_dirs, variant))
    request = validate_request(raw_inputs(**fields), info)
    events = list(run_in_process(request, info, TorchFluxModels(info)))
    final = events[-1]
    assert isinstance(final, FinalImage) and final.cache is not None
    calls = request.num_inference_steps * (2 if request.do_true_cfg else 1)
    assert final.cache["dit_calls"] == calls
    assert 0 < final.cache["dit_calls_skipped"] < calls - 1  # some skipped, not all
    with first_block_cache(pipes[variant], request.cache_threshold):
        expected, _, latents = diffusers_image(pipes[variant], request)
    steps = [e for e in events if isinstance(e, StepUpdate)]
    print(f"\n{case}: {final.cache}, uint8 max diff "
          f"{int(np.abs(final.image.numpy().astype(int) - expected).max())}")
    assert np.array_equal(final.image.numpy(), expected)
    assert len(steps) == len(latents) == request.num_inference_steps
    # ... and caching did change the image: the test would see a cache that never skips
    uncached, _, _ = diffusers_image(pipes[variant], validate_request(
        raw_inputs(**dict(fields, cache_threshold=0.0)), info))
    assert not np.array_equal(uncached, expected)


def test_no_threshold_runs_every_block(model_dirs):
    info = load_model_info(model_dirs["schnell"])
    plain = validate_request(raw_inputs(prompt=PROMPT, num_inference_steps=3, seed=2), info)
    zero = validate_request(raw_inputs(prompt=PROMPT, num_inference_steps=3, seed=2,
                                       cache_threshold=0.0), info)
    assert plain == zero and plain.cache_threshold == 0.0
    final = list(run_in_process(zero, info, TorchFluxModels(info)))[-1]
    assert final.cache is None


@pytest.mark.fast
@pytest.mark.parametrize("value, text", [(-0.1, "[0.0, 1.0]"), (1.5, "[0.0, 1.0]"),
                                         (float("nan"), "finite"), (float("inf"), "finite")])
def test_invalid_thresholds_name_the_field(model_dirs, value, text):
    info = load_model_info(model_dirs["schnell"])
    with pytest.raises(InvalidRequest, match=text.replace("[", r"\[")) as caught:
        validate_request(raw_inputs(prompt=PROMPT, cache_threshold=value), info)
    assert caught.value.field == "cache_threshold"


@pytest.mark.fast
def test_graph_backends_refuse_the_cache_naming_the_runtime(model_dirs):
    info = load_model_info(model_dirs["schnell"])
    with pytest.raises(InvalidRequest, match="PyTorch runtime") as caught:
        validate_request(raw_inputs(prompt=PROMPT, cache_threshold=0.2), info, step_cache=False)
    assert caught.value.field == "cache_threshold"
    validate_request(raw_inputs(prompt=PROMPT, cache_threshold=0.0), info, step_cache=False)


def test_served_cache_equals_diffusers_and_reports_the_skips(served, pipes):
    """Served: the same image as diffusers' cache, every step streamed, the skipped DiT calls in
    the timings; a request without the cache between two with it is not disturbed."""
    variant, fields = CASES["schnell, 2 prompts x 2 images"]
    result = served_generate(served[variant], fields)
    assert result.error is None, result.error
    request = validate_request(raw_inputs(**fields), served[variant].info)
    with first_block_cache(pipes[variant], request.cache_threshold):
        expected, _, _ = diffusers_image(pipes[variant], request)
    assert np.array_equal(result.image, expected)
    assert len(result.steps) == request.num_inference_steps
    report = result.timings["first_block_cache"]
    assert report["dit_calls"] == 8 and 0 < report["dit_calls_skipped"] < 8
    plain = served_generate(served[variant], dict(fields, cache_threshold=0.0))
    assert "first_block_cache" not in plain.timings
    expected_plain, _, _ = diffusers_image(pipes[variant], validate_request(
        raw_inputs(**dict(fields, cache_threshold=0.0)), served[variant].info))
    assert np.array_equal(plain.image, expected_plain)


def test_served_onnx_refuses_the_cache(served_onnx):
    result = served_generate(served_onnx["schnell"], dict(prompt=PROMPT, num_inference_steps=2,
                                                          height=64, width=64, cache_threshold=0.3))
    assert result.kinds == ["error"] and "`cache_threshold`" in result.error
    assert "PyTorch runtime" in result.error


@pytest.mark.parametrize("with_mask", [False, True], ids=["image-to-image", "inpainting"])
def test_cache_on_image_inputs_equals_diffusers(model_dirs, with_mask):
    """The fast tier on an edit: FluxImg2ImgPipeline / FluxInpaintPipeline with the same cache."""
    from tests.test_image_inputs import diffusers_edit, edit_inputs

    info = load_model_info(model_dirs["dev"])
    fields = dict(prompt=["a red circle"], strength=0.9, num_inference_steps=8, seed=4,
                  cache_threshold=0.5)
    request = validate_request(edit_inputs(fields, (1, 64, 80), with_mask, "dev"), info)
    final = list(run_in_process(request, info, TorchFluxModels(info)))[-1]
    assert final.cache["dit_calls_skipped"] > 0
    expected, _ = diffusers_edit(model_dirs["dev"], request)
    assert np.array_equal(final.image.numpy(), expected)
