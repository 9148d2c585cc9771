"""FLUX.2 (klein and dev) through the shared pipeline: bit-equal to diffusers' Flux2KleinPipeline
and Flux2Pipeline on the CPU, every step's preview equal to the pipeline's latents."""

import json
import shutil

import numpy as np
import pytest
import torch

from flux_triton import sampling
from flux_triton.model_info import load_model_info
from flux_triton.request import InvalidRequest, validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.specs import component_specs, networks
from tests.reference import diffusers_image, raw_inputs

pytestmark = pytest.mark.fast  # no server

CASES = {
    "2 prompts x 2 images, 64x96": dict(prompt=["a red circle on blue", "two green squares"],
                                        num_images_per_prompt=2, height=64, width=96, seed=7),
    "custom sigmas, short text": dict(prompt="a horse", sigmas=[1.0, 0.7, 0.3], height=48,
                                      width=48, seed=3, max_sequence_length=24),
}


def assert_in_process_matches(pipe, info, fields, preview_kind="latent"):
    request = validate_request(raw_inputs(**fields, preview_kind=preview_kind), info)
    events = list(run_in_process(request, info, TorchFluxModels(info)))
    expected, _, step_latents = diffusers_image(pipe, request)
    assert np.array_equal(events[-1].image.numpy(), expected)
    lat_h, lat_w = sampling.latent_grid(request.height, request.width, info.vae_scale_factor)
    assert len(events) - 1 == len(step_latents) == request.num_inference_steps
    for event, latents in zip(events[:-1], step_latents):
        expected_preview = sampling.LAYOUTS["flux2"].unpack(latents, lat_h, lat_w)
        assert torch.equal(event.preview_latent, expected_preview), f"step {event.step}"
    return events


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_in_process_identical_to_diffusers(flux2_dirs, flux2_pipes, variant, case):
    info = load_model_info(flux2_dirs[variant])
    assert_in_process_matches(flux2_pipes[variant], info, CASES[case])


def test_flux2_klein_base_guidance_is_cfg_against_the_empty_prompt(flux2_dirs, tmp_path):
    """A klein base model (not step-distilled): guidance_scale > 1 runs classifier-free guidance,
    two DiT calls a step, exactly as Flux2KleinPipeline."""
    from diffusers import Flux2KleinPipeline

    folder = tmp_path / "klein-base"
    shutil.copytree(flux2_dirs["klein"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, is_distilled=False)))
    info = load_model_info(folder)
    assert info.guidance_is_cfg and not info.is_distilled
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    assert_in_process_matches(pipe, info, dict(prompt=["a cat", "a dog"], guidance_scale=3.5,
                                                height=32, width=64, seed=5))


def test_flux2_x0_previews_are_the_predicted_clean_latents(flux2_dirs, flux2_pipes):
    info = load_model_info(flux2_dirs["klein"])
    events = assert_in_process_matches(flux2_pipes["klein"], info,
                                       dict(prompt="a star", height=32, width=32, seed=2), "both")
    last = events[-2]
    # the last step lands on sigma 0: its latents are the clean latents it predicted
    assert torch.allclose(last.preview_x0, last.preview_latent, atol=1e-5)
    assert last.preview_x0.shape == (1, info.latent_channels * 4, 2, 2)


def test_flux2_folders_are_recognised(flux2_dirs):
    klein, dev = (load_model_info(flux2_dirs[v]) for v in ("klein", "dev"))
    assert (klein.family, klein.text_encoder_layers, klein.is_distilled, klein.guidance_embeds) == (
        "flux2", (9, 18, 27), True, False)
    assert (dev.family, dev.text_encoder_layers, dev.guidance_embeds) == ("flux2", (10, 20, 30), True)
    assert networks(dev) == ("text_encoder", "dit_transformer", "vae_decoder", "vae_encoder")
    specs = component_specs(dev, "BF16")
    assert "pooled_projections" not in {t.name for t in specs["dit_transformer"].inputs}
    assert specs["dit_transformer"].input("img_ids").dtype == "INT64"
    assert specs["dit_transformer"].input("img_ids").dims == ("S_img", 4)
    assert specs["encode_prompt"].outputs[0].dims == ("N", "S_txt", dev.text_embed_dim)


@pytest.mark.parametrize("field, value", [
    ("prompt_2", "a second prompt"), ("negative_prompt", "blurry"), ("true_cfg_scale", 4.0),
    ("lora", "style"), ("cache_threshold", 0.1), ("cache_threshold", 1),
])
def test_flux2_refuses_what_does_not_apply_naming_the_field(flux2_dirs, field, value):
    info = load_model_info(flux2_dirs["dev"])
    with pytest.raises(InvalidRequest) as raised:
        validate_request(raw_inputs(prompt="a cat", **{field: value}), info)
    assert raised.value.field == field and "FLUX.2" in str(raised.value)


def test_flux2_max_sequence_length_is_bounded_by_the_pipelines_512(flux2_dirs):
    info = load_model_info(flux2_dirs["klein"])
    assert validate_request(raw_inputs(prompt="a", max_sequence_length=512), info).max_sequence_length == 512
    with pytest.raises(InvalidRequest, match=r"max_sequence_length.*\[1, 512\]"):
        validate_request(raw_inputs(prompt="a", max_sequence_length=513), info)


def test_flux2_repository_serves_its_own_networks(flux2_dirs, model_dirs, tmp_path):
    from flux_triton.export.repository import render_repository, write_repository

    rendered = render_repository(flux2_dirs["dev"], repository=tmp_path / "repo")
    assert set(rendered.texts) == {"tokenizer", "text_encoder", "dit_transformer", "vae_decoder",
                                   "vae_encoder", "encode_prompt", "flux_bls"}
    assert '"text_encoder"' in rendered.texts["encode_prompt"]
    assert "pooled_projections" not in rendered.texts["dit_transformer"]
    assert 'name: "lora"' not in rendered.texts["dit_transformer"]  # no adapters, no cache
    assert "cache_threshold" not in rendered.texts["dit_transformer"]
    onnx = render_repository(flux2_dirs["dev"], backend="onnx", repository=tmp_path / "repo")
    assert onnx.options["text_encoder"].backend == "onnx"
    # a FLUX.1 export over it leaves FLUX.2's text encoder without a config, and back again
    dest = tmp_path / "repo"
    write_repository(flux2_dirs["klein"], dest)
    assert (dest / "text_encoder" / "config.pbtxt").exists()
    write_repository(model_dirs["schnell"], dest)
    assert not (dest / "text_encoder" / "config.pbtxt").exists()
    assert (dest / "t5_encoder" / "config.pbtxt").exists()
    write_repository(flux2_dirs["klein"], dest)
    assert not (dest / "t5_encoder" / "config.pbtxt").exists()


def _pictures(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random colour fields (what a photo's low frequencies look like), uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 4, 4, 3)).astype(np.float32)
    ys, xs = np.linspace(0, 3, height), np.linspace(0, 3, width)
    y0, x0 = np.floor(ys).astype(int).clip(0, 2), np.floor(xs).astype(int).clip(0, 2)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = small[:, y0][:, :, x0] * (1 - fx) + small[:, y0][:, :, x0 + 1] * fx
    bottom = small[:, y0 + 1][:, :, x0] * (1 - fx) + small[:, y0 + 1][:, :, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).round().astype(np.uint8)


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_reference_images_identical_to_diffusers(flux2_dirs, flux2_pipes, variant):
    """Multi-reference editing: two reference images (not multiples of 16: cropped) join every
    prompt's sequence; the output takes the first one's size."""
    info = load_model_info(flux2_dirs[variant])
    events = assert_in_process_matches(
        flux2_pipes[variant], info, dict(prompt=["make it red", "make it blue"],
                                         image=_pictures(2, 70, 100, 1), seed=4))
    assert events[-1].image.shape == (2, 64, 96, 3)


def test_flux2_large_reference_is_resized_to_a_megapixel(flux2_dirs, flux2_pipes):
    info = load_model_info(flux2_dirs["klein"])
    fields = dict(prompt="a cat", image=_pictures(1, 1100, 1000, 2), height=32, width=32, seed=1,
                  num_inference_steps=1)
    assert_in_process_matches(flux2_pipes["klein"], info, fields)


@pytest.mark.parametrize("fields, field, message", [
    (dict(image=np.zeros((1, 63, 64, 3), np.uint8)), "image", "height must be in [64"),
    (dict(image=np.zeros((1, 64, 520, 3), np.uint8)), "image", "aspect ratio must be at most 8"),
    (dict(image=np.zeros((11, 64, 64, 3), np.uint8)), "image", "1 to 10 reference images"),
    (dict(image=np.zeros((1, 64, 2056, 3), np.uint8)), "image", "width must be in [64, 2048]"),
    (dict(image=np.zeros((1, 64, 64, 4), np.uint8)), "image", "got 4 channels"),
    (dict(image=np.zeros((1, 64, 64, 3), np.float32)), "image", "must be UINT8"),
    (dict(image=np.zeros((1, 64, 64, 3), np.uint8), image_role="init"), "image_role", "reference"),
    (dict(image=np.zeros((1, 64, 64, 3), np.uint8), strength=0.5), "strength", "FLUX.2"),
    (dict(image=np.zeros((1, 64, 64, 3), np.uint8), mask=np.zeros((1, 64, 64), np.uint8)), "mask",
     "FLUX.2"),
])
def test_flux2_reference_images_are_validated(flux2_dirs, fields, field, message):
    info = load_model_info(flux2_dirs["klein"])
    with pytest.raises(InvalidRequest) as raised:
        validate_request(raw_inputs(prompt="a cat", **fields), info)
    assert raised.value.field == field and message in str(raised.value)


def test_flux2_tensorrt_profiles_come_from_the_same_specs(flux2_dirs):
    from flux_triton.export.profiles import load_engine_config

    info = load_model_info(flux2_dirs["dev"])
    config = load_engine_config(info)
    specs = component_specs(info)
    assert config.precision["text_encoder"] == "BF16"
    decoder = config.profile(specs["vae_decoder"])["latents"]
    assert decoder[1] == (1, info.latent_channels * 4, 64, 64)  # 1024 px at opt: 64 patches a side
    dit = config.profile(specs["dit_transformer"])
    # the output's tokens and one reference image's, at most a megapixel (64 x 64 patches)
    assert dit["img_ids"][2] == ((1344 // 16) ** 2 + 64**2, 4)
    assert dit["txt_ids"][1] == (512, 4)


def test_flux2_tensorrt_limits_follow_the_profiles(flux2_dirs, tmp_path):
    """A TensorRT deployment refuses what its plans cannot take, naming the field: more
    reference images than `reference_images` of engine_config.json, a size beyond its range."""
    from flux_triton.export.profiles import ENGINE_CONFIG, load_engine_config
    from flux_triton.export.repository import render_repository
    from flux_triton.serving_config import ServingLimits

    info = load_model_info(flux2_dirs["klein"])
    raw = json.loads(ENGINE_CONFIG.read_text())
    raw["reference_images"] = 3
    custom = tmp_path / "engine_config.json"
    custom.write_text(json.dumps(raw))
    config = load_engine_config(info, custom)
    tokens = (1344 // 16) ** 2
    assert config.axes["S_img"].max == tokens + 3 * 64**2
    limits = config.serving_limits(ServingLimits(), info)
    assert (limits.max_reference_images, limits.max_height, limits.max_width, limits.max_batch) == (
        3, 1344, 1344, 4)
    raw["reference_images"] = 0
    custom.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="reference_images"):
        load_engine_config(info, custom)

    served = render_repository(flux2_dirs["klein"], backend="tensorrt", device="gpu")
    limits = served.options["flux_bls"].limits
    assert (limits.max_reference_images, limits.max_height) == (1, 1344)
    two = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(InvalidRequest, match="1 to 1 reference") as raised:
        validate_request(raw_inputs(prompt="a cat", image=two), info, limits)
    assert raised.value.field == "image"
    validate_request(raw_inputs(prompt="a cat", image=two), info)  # the torch backend takes 10
