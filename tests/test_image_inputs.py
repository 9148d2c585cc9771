"""Image inputs: image-to-image, inpainting and Kontext editing, bit-exact with diffusers'
FluxImg2ImgPipeline, FluxInpaintPipeline and FluxKontextPipeline on the same images and seed, in
process and served (every step's preview too); every bad image input is refused naming its field."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from flux_triton import images, sampling
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage, StepUpdate
from flux_triton.request import InvalidRequest, validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import ServingLimits
from tests.reference import SHAPES_DIR, first_block_cache, raw_inputs, served_generate


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB test image: smooth gradients with noise (resizing changes it measurably)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def box_mask(height: int, width: int) -> np.ndarray:
    """255 (repaint) inside a box off the centre, 0 elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 5: height * 3 // 4, width // 4: width * 2 // 3] = 255
    return mask


# (fields, image shape [N, H, W], mask or not); sizes not the model's default, one case resized
EDITS = {
    "img2img, 2 prompts x 2 images": (dict(prompt=["a red circle", "a cat"], num_images_per_prompt=2,
                                           strength=0.7, num_inference_steps=5, seed=3), (1, 96, 64),
                                      False),
    "img2img, an image per prompt, resized": (dict(prompt=["a red circle", "a cat"], strength=0.5,
                                                   num_inference_steps=6, height=64, width=96,
                                                   seed=8), (2, 100, 70), False),
    "inpaint, 2 images per prompt": (dict(prompt=["a blue square"], num_images_per_prompt=2,
                                          strength=0.9, num_inference_steps=4, seed=5),
                                     (1, 64, 128), True),
    "inpaint, default strength, true CFG": (dict(prompt=["a horse"], negative_prompt="blurry",
                                                 true_cfg_scale=3.0, num_inference_steps=5, seed=2),
                                            (1, 80, 80), True),
}


def edit_inputs(fields: dict, shape: tuple[int, int, int], with_mask: bool,
                variant: str) -> dict[str, np.ndarray]:
    raw = raw_inputs(**dict(fields, **({"guidance_scale": 4.5} if variant == "dev" else {})))
    count, height, width = shape
    raw["image"] = np.stack([picture(height, width, seed) for seed in range(count)])
    if with_mask:
        raw["mask"] = box_mask(height, width)[None]
    return raw


def diffusers_edit(model_dir, request, reference_area: int | None = None):
    """diffusers' own pipeline for the request's role, called as a user calls it (PIL images,
    the output size given, strength as FP32 holds it): (uint8 image, per-step packed latents)."""
    import diffusers
    from PIL import Image

    kwargs = dict(prompt=list(request.prompts), prompt_2=list(request.prompts_2),
                  height=request.height, width=request.width,
                  num_inference_steps=request.num_inference_steps,
                  num_images_per_prompt=request.num_images_per_prompt,
                  max_sequence_length=request.max_sequence_length,
                  guidance_scale=request.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(request.seed))
    if request.negative_prompts is not None:
        kwargs.update(negative_prompt=list(request.negative_prompts),
                      negative_prompt_2=list(request.negative_prompts_2),
                      true_cfg_scale=request.true_cfg_scale)
    pictures = [Image.fromarray(a) for a in request.image]
    kwargs["image"] = pictures if len(pictures) > 1 else pictures[0]
    if request.edits_reference:
        cls = diffusers.FluxKontextPipeline
        kwargs["max_area"] = reference_area
        # the request's height and width before the Kontext rescale: the image's size
        kwargs["height"], kwargs["width"] = images.default_size(
            *request.image.shape[1:3], 16)
    elif request.mask is not None:
        cls = diffusers.FluxInpaintPipeline
        masks = [Image.fromarray(m) for m in request.mask]
        kwargs.update(mask_image=masks if len(masks) > 1 else masks[0], strength=request.strength)
    else:
        cls = diffusers.FluxImg2ImgPipeline
        kwargs["strength"] = request.strength
    pipe = cls.from_pretrained(model_dir, dtype=torch.float32)
    context = contextlib.ExitStack()
    if request.cache_threshold > 0:  # the fast tier: diffusers' own first-block cache
        context.enter_context(first_block_cache(pipe, request.cache_threshold))
        # FluxImg2Img/InpaintPipeline (0.42.1) name no cache context, which the hooks need; the
        # one FluxPipeline gives the prompt's calls (these cases have no negative prompt)
        context.enter_context(pipe.transformer.cache_context("cond"))
    steps = []

    def keep(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    with context:
        out = pipe(output_type="np", callback_on_step_end=keep, **kwargs).images
    return (out * 255).round().astype("uint8"), steps


def in_process(info, request, models=None):
    models = models or TorchFluxModels(info)
    events = list(run_in_process(request, info, models))
    return events[-1], [e for e in events if isinstance(e, StepUpdate)]


def assert_steps_equal(request, step_previews, diffusers_steps, info) -> None:
    lat_h, lat_w = sampling.latent_grid(request.height, request.width, info.vae_scale_factor)
    assert len(step_previews) == len(diffusers_steps) > 0
    for preview, packed in zip(step_previews, diffusers_steps):
        expected = sampling.unpack_latents(packed, lat_h, lat_w).float().numpy()
        assert np.array_equal(np.asarray(preview), expected)


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize("case", list(EDITS))
def test_in_process_edits_equal_diffusers(model_dirs, variant, case):
    info = load_model_info(model_dirs[variant])
    fields, shape, with_mask = EDITS[case]
    request = validate_request(edit_inputs(fields, shape, with_mask, variant), info)
    final, steps = in_process(info, request)
    expected, diffusers_steps = diffusers_edit(model_dirs[variant], request)
    assert isinstance(final, FinalImage) and final.image.shape == expected.shape
    print(f"\n{variant} {case}: {list(expected.shape)}, {len(steps)} of "
          f"{request.num_inference_steps} steps, uint8 max diff "
          f"{int(np.abs(final.image.numpy().astype(int) - expected).max())}")
    assert np.array_equal(final.image.numpy(), expected)
    assert len(steps) == request.num_inference_steps - sampling.strength_start(
        request.num_inference_steps, request.strength)
    assert_steps_equal(request, [s.preview_latent for s in steps], diffusers_steps, info)


KONTEXT = {
    "portrait image, output at its aspect": (dict(prompt=["make it red", "a cat"], seed=3,
                                                  num_inference_steps=3), (1, 100, 70)),
    "wide image, 2 images per prompt": (dict(prompt=["add a hat"], num_images_per_prompt=2, seed=4,
                                             num_inference_steps=2, guidance_scale=2.5),
                                        (1, 64, 160)),
}


@pytest.fixture
def kontext_diffusers(kontext_dir, monkeypatch):
    """FluxKontextPipeline with its preferred resolutions at the tiny folder's max_area (the ones
    the server uses for it; at FLUX's 1024**2 they are diffusers' own)."""
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext

    info = load_model_info(kontext_dir)
    monkeypatch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS",
                        list(images.kontext_resolutions(info.max_area)))
    yield info
    images.kontext_resolutions.cache_clear()  # it may have read the patched table


def kontext_inputs(fields: dict, shape) -> dict[str, np.ndarray]:
    raw = raw_inputs(**fields)
    raw["image"] = np.stack([picture(shape[1], shape[2], seed) for seed in range(shape[0])])
    raw["image_role"] = np.array([b"reference"], dtype=object)
    return raw


@pytest.mark.parametrize("case", list(KONTEXT))
def test_in_process_kontext_equals_diffusers(kontext_dir, kontext_diffusers, case):
    info = kontext_diffusers
    assert info.kontext and info.max_area == 128 * 128
    fields, shape = KONTEXT[case]
    request = validate_request(kontext_inputs(fields, shape), info)
    final, steps = in_process(info, request)
    expected, diffusers_steps = diffusers_edit(kontext_dir, request, info.max_area)
    print(f"\nkontext {case}: output {request.height}x{request.width}, reference "
          f"{images.kontext_reference_size(*shape[1:], info.max_area, 16)}, uint8 max diff "
          f"{int(np.abs(final.image.numpy().astype(int) - expected).max())}")
    assert np.array_equal(final.image.numpy(), expected)
    assert_steps_equal(request, [s.preview_latent for s in steps], diffusers_steps, info)


@pytest.mark.fast
def test_kontext_sizes_are_diffusers_at_full_size():
    """At FLUX's max_area the resolution table is diffusers' own; the output keeps the aspect."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert images.kontext_resolutions(1024**2) == tuple(PREFERRED_KONTEXT_RESOLUTIONS)
    assert images.kontext_output_size(768, 1360, 1024**2, 16) == (768, 1360)
    assert images.kontext_output_size(512, 512, 1024**2, 16) == (1024, 1024)
    assert images.kontext_reference_size(600, 800, 1024**2, 16) == (880, 1184)
    assert images.kontext_resolutions(128 * 128)[8] == (128, 128)


# -- served through Triton -----------------------------------------------------------------------

def served_edit(served, raw: dict[str, np.ndarray], **fields):
    """Stream a request given as raw numpy inputs (images included) from a test server."""
    from flux_triton.clients.stream_client import build_inputs

    values = {}
    for name, value in raw.items():
        if value.dtype == object:
            values[name] = [v.decode() for v in value]
        elif name in ("image", "mask"):
            values[name] = value
        else:
            values[name] = value.reshape(-1).tolist() if name == "sigmas" else value.reshape(-1)[0].item()
    values.update(fields)
    client = served.client()
    try:
        from flux_triton.clients.stream_client import stream_generate
        return stream_generate(client, build_inputs(**values), timeout_s=180)
    finally:
        client.close()


@pytest.mark.parametrize("variant, case", [("schnell", "img2img, an image per prompt, resized"),
                                           ("dev", "inpaint, 2 images per prompt")])
def test_served_edits_equal_diffusers(served, model_dirs, variant, case):
    srv = served[variant]
    fields, shape, with_mask = EDITS[case]
    raw = edit_inputs(fields, shape, with_mask, variant)
    result = served_edit(srv, raw)
    assert result.error is None, result.error
    request = validate_request(raw, srv.info)
    expected, diffusers_steps = diffusers_edit(model_dirs[variant], request)
    assert np.array_equal(result.image, expected)
    assert_steps_equal(request, [s["preview_latent"] for s in result.steps], diffusers_steps, srv.info)
    assert result.steps[0]["total_steps"] == len(diffusers_steps)


def test_served_kontext_equals_diffusers(served_kontext, kontext_dir, kontext_diffusers):
    fields, shape = KONTEXT["portrait image, output at its aspect"]
    raw = kontext_inputs(fields, shape)
    result = served_edit(served_kontext, raw)
    assert result.error is None, result.error
    request = validate_request(raw, served_kontext.info)
    expected, diffusers_steps = diffusers_edit(kontext_dir, request, kontext_diffusers.max_area)
    assert result.image.shape == expected.shape == (2, 144, 96, 3)
    assert np.array_equal(result.image, expected)
    assert_steps_equal(request, [s["preview_latent"] for s in result.steps], diffusers_steps,
                       served_kontext.info)
    # a mask or a strength with a reference image: refused, naming the field
    for extra, field in ((dict(mask=box_mask(*shape[1:])[None]), "mask"), (dict(strength=0.5), "strength")):
        refused = served_edit(served_kontext, raw, **extra)
        assert refused.kinds == ["error"] and f"`{field}`" in refused.error, refused.error


# -- the trained default -------------------------------------------------------------------------

def test_shapes_model_edits_equal_diffusers_and_previews_start_from_the_image(served_shapes):
    """On the trained default, served image-to-image and inpainting equal diffusers; the first
    x0 preview of an image-to-image run is the init image's latents, not text-to-image's."""
    info = served_shapes.info
    source = validate_request(raw_inputs(prompt="a red circle on a blue background", seed=1), info)
    models = TorchFluxModels(info)
    source_image = in_process(info, source, models)[0].image.numpy()
    prompt = "a red square on a blue background"
    for with_mask in (False, True):
        raw = raw_inputs(prompt=prompt, seed=2, strength=0.8, preview_kind="both")
        raw["image"] = source_image
        if with_mask:
            raw["mask"] = box_mask(*source_image.shape[1:3])[None]
        result = served_edit(served_shapes, raw)
        assert result.error is None, result.error
        request = validate_request(raw, info)
        expected, diffusers_steps = diffusers_edit(SHAPES_DIR, request)
        assert np.array_equal(result.image, expected)
        assert_steps_equal(request, [s["preview_latent"] for s in result.steps], diffusers_steps, info)
    with torch.inference_mode():
        init_latents = models.parts["vae_encoder"](
            image=images.image_pixels(source_image, 128, 128, info),
            noise=torch.zeros(1, info.latent_channels, 16, 16))["latents"].numpy()
    text_only = served_generate(served_shapes, dict(prompt=prompt, seed=2, preview_kind="x0"))
    edit_x0 = served_edit(served_shapes, dict(raw_inputs(prompt=prompt, seed=2, strength=0.6,
                                                         preview_kind="x0"), image=source_image))
    first_edit, first_text = edit_x0.steps[0]["preview_x0"], text_only.steps[0]["preview_x0"]
    edit_error = float(np.mean((first_edit - init_latents) ** 2))
    text_error = float(np.mean((first_text - init_latents) ** 2))
    apart = float(np.mean((first_edit - first_text) ** 2))
    print(f"\nfirst x0 preview vs the init image's latents: image-to-image MSE {edit_error:.4f}, "
          f"text-to-image {text_error:.4f}; the two previews apart {apart:.4f}")
    # the edit's first preview is the init image partly redrawn toward the new prompt (a circle
    # becoming a square): nearer the init image than text-to-image's guess from noise, and nearer
    # it than to that guess
    assert edit_error < 0.5 * text_error and edit_error < apart


# -- validation ------------------------------------------------------------------------------------

def _validate(info, limits=None, **fields):
    image = fields.pop("image", picture(64, 64, 0)[None])
    extra = {k: fields.pop(k) for k in ("mask", "image_role") if k in fields}
    raw = raw_inputs(**dict(dict(prompt=["a cat"], num_inference_steps=4), **fields))
    if image is not None:
        raw["image"] = image
    for name, value in extra.items():
        raw[name] = (np.array([value.encode()], dtype=object) if isinstance(value, str) else value)
    return validate_request(raw, info, limits)


# (fields, field named, text of the message)
INVALID_IMAGES = {
    "float image": (dict(image=np.zeros((1, 64, 64, 3), np.float32)), "image", "UINT8"),
    "int64 image": (dict(image=np.zeros((1, 64, 64, 3), np.int64)), "image", "UINT8"),
    "no batch axis": (dict(image=np.zeros((64, 64, 3), np.uint8)), "image", "shape [64, 64, 3]"),
    "RGBA": (dict(image=np.zeros((1, 64, 64, 4), np.uint8)), "image", "4 channels"),
    "grey": (dict(image=np.zeros((1, 64, 64, 1), np.uint8)), "image", "1 channels"),
    "empty": (dict(image=np.zeros((1, 0, 64, 3), np.uint8)), "image", "height must be in [16, 2048]"),
    "tiny": (dict(image=np.zeros((1, 8, 64, 3), np.uint8)), "image", "height must be in [16, 2048]"),
    "huge": (dict(image=np.zeros((1, 16, 4096, 3), np.uint8)), "image", "width must be in [16, 2048]"),
    "3 images for 2 prompts": (dict(prompt=["a", "b"], image=np.zeros((3, 64, 64, 3), np.uint8)),
                               "image", "1 image or one per prompt (2), got 3"),
    "object image": (dict(image=np.array([[b"x"]], dtype=object)), "image", "UINT8"),
    "mask size": (dict(mask=np.zeros((1, 64, 32), np.uint8)), "mask", "image's size 64 x 64"),
    "mask float": (dict(mask=np.zeros((1, 64, 64), np.float32)), "mask", "UINT8"),
    "mask RGB": (dict(mask=np.zeros((1, 64, 64, 3), np.uint8)), "mask", "shape [1, 64, 64, 3]"),
    "mask count": (dict(prompt=["a", "b"], image=np.zeros((2, 64, 64, 3), np.uint8),
                        mask=np.zeros((3, 64, 64), np.uint8)), "mask", "1 mask or one per image"),
    "strength zero": (dict(strength=0.0), "strength", "(0, 1]"),
    "strength above 1": (dict(strength=1.5), "strength", "[0.0, 1.0]"),
    "strength NaN": (dict(strength=float("nan")), "strength", "[0.0, 1.0]"),
    "strength negative": (dict(strength=-0.2), "strength", "[0.0, 1.0]"),
    "strength too low for the steps": (dict(strength=1e-20), "strength", "leaves no step of 4"),
    "strength without image": (dict(image=None, strength=0.5), "strength", "send `image`"),
    "mask without image": (dict(image=None, mask=np.zeros((1, 64, 64), np.uint8)), "mask",
                           "send `image`"),
    "role without image": (dict(image=None, image_role="init"), "image_role", "send `image`"),
    "unknown role": (dict(image_role="style"), "image_role", "['init', 'reference']"),
    "reference without Kontext": (dict(image_role="reference"), "image_role", "not one"),
    "height not a multiple": (dict(height=72), "height", "multiple of 16"),
}


@pytest.mark.fast
@pytest.mark.parametrize("case", list(INVALID_IMAGES))
def test_invalid_image_inputs_name_the_field(model_dirs, case):
    info = load_model_info(model_dirs["schnell"])
    fields, field, text = INVALID_IMAGES[case]
    with pytest.raises(InvalidRequest) as caught:
        _validate(info, **dict(fields))
    assert caught.value.field == field and text in str(caught.value), str(caught.value)


@pytest.mark.fast
def test_image_inputs_take_defaults_from_the_image(model_dirs, kontext_dir):
    info = load_model_info(model_dirs["schnell"])
    request = _validate(info, image=np.zeros((1, 100, 70, 3), np.uint8))
    assert (request.height, request.width, request.strength, request.image_role) == (96, 64, 0.6, "init")
    request = _validate(info, image=np.zeros((1, 100, 70, 3), np.uint8), height=32, width=48)
    assert (request.height, request.width) == (32, 48)
    kontext = load_model_info(kontext_dir)
    request = _validate(kontext, image=np.zeros((1, 100, 70, 3), np.uint8), image_role="reference")
    assert (request.height, request.width) == (144, 96) and request.edits_reference
    with pytest.raises(InvalidRequest, match="max_pixel_steps") as caught:
        _validate(kontext, ServingLimits(max_pixel_steps=144 * 96 * 4), image_role="reference",
                  image=np.zeros((1, 100, 70, 3), np.uint8))
    assert "reference pixels" in str(caught.value)
    with pytest.raises(InvalidRequest, match="outside") as caught:
        _validate(kontext, image=np.zeros((1, 16, 2048, 3), np.uint8), image_role="reference")
    assert caught.value.field == "height"


@pytest.mark.parametrize("case", ["huge", "mask size", "strength zero", "reference without Kontext",
                                  "strength too low for the steps"])
def test_served_image_errors_name_the_field_and_keep_serving(served, case):
    srv = served["schnell"]
    fields, field, text = INVALID_IMAGES[case]
    fields = dict(fields)
    raw = raw_inputs(prompt=["a cat"], num_inference_steps=4, seed=1)
    raw["image"] = fields.pop("image", picture(64, 64, 0)[None])
    if "mask" in fields:
        raw["mask"] = fields.pop("mask")
    result = served_edit(srv, raw, **fields)
    assert result.kinds == ["error"] and f"`{field}`" in result.error and text in result.error, \
        result.error
    ok = served_generate(srv, dict(prompt=["a cat"], height=64, width=64, num_inference_steps=2, seed=1))
    assert ok.error is None
