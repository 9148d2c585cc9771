"""A generation request, its defaults and its validation (FluxPipeline.check_inputs and more).

Every error names the offending field and the allowed range, so the server can return it as
INVALID_ARG before any model runs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from flux_triton import images, sampling
from flux_triton.errors import field_message
from flux_triton.model_info import FluxModelInfo
from flux_triton.serving_config import ServingLimits
from flux_triton.specs import BLS_INPUTS, CACHE_THRESHOLD_RANGE, IMAGE_ROLES, PREVIEW_KINDS


class InvalidRequest(ValueError):
    """A client input is invalid; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(field_message(field, message))
        self.field = field


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request with every default filled in."""

    prompts: tuple[str, ...]
    prompts_2: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    negative_prompts_2: tuple[str, ...] | None
    height: int
    width: int
    num_inference_steps: int
    num_images_per_prompt: int
    max_sequence_length: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    sigmas: tuple[float, ...] | None
    deadline_ms: int | None = None
    preview_kind: str = "latent"  # what each step's response carries (specs.PREVIEW_KINDS)
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters and their scales, in order
    image: np.ndarray | None = None  # uint8 [N, H, W, 3]: one image, or one per prompt
    mask: np.ndarray | None = None  # uint8 [N, H, W]: 255 repaints, 0 keeps (inpainting)
    strength: float = 0.6  # how far an `init` image is noised: the share of the steps run
    image_role: str = "init"  # `init` (image-to-image, inpainting) or `reference` (Kontext)
    cache_threshold: float = 0.0  # first-block caching of the DiT's blocks (0: off)

    @property
    def edits_reference(self) -> bool:
        """A Kontext edit: the image's tokens join the sequence, the schedule is text-to-image's."""
        return self.image is not None and self.image_role == "reference"

    @property
    def batch_size(self) -> int:
        """Images generated: prompts x images per prompt."""
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def do_true_cfg(self) -> bool:
        """FluxPipeline runs true CFG when true_cfg_scale > 1 and a negative prompt is given."""
        return self.true_cfg_scale > 1 and self.negative_prompts is not None


# Field groups by declared type (specs.BLS_INPUTS is the one declaration of the interface): the
# prompt strings are BYTES [N].
STRING_FIELDS = tuple(t.name for t in BLS_INPUTS if t.dtype == "BYTES" and t.dims == ("N",))
KNOWN_FIELDS = frozenset(t.name for t in BLS_INPUTS)
SEED_RANGE = (0, 2**63 - 1)
DEFAULT_STRENGTH = 0.6  # the image pipelines' default
LORA_SCALE_LIMIT = 100.0
DEADLINE_RANGE_MS = (1, 86_400_000)


def _strings(field: str, value: np.ndarray, limits: ServingLimits) -> tuple[str, ...]:
    flat = np.asarray(value).reshape(-1)
    if flat.size == 0:
        raise InvalidRequest(field, "must hold at least one string, got an empty tensor")
    out = []
    for item in flat:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(field, "must be UTF-8 text") from None
        elif not isinstance(item, str):
            raise InvalidRequest(field, f"must be BYTES (UTF-8 strings), got {type(item).__name__}")
        if len(item) > limits.max_prompt_chars:
            raise InvalidRequest(
                field, f"each string must have at most {limits.max_prompt_chars} characters, "
                f"got {len(item)}"
            )
        out.append(item)
    return tuple(out)


def _choice(name: str, raw, allowed: tuple[str, ...], default: str, limits: ServingLimits) -> str:
    """One string of `allowed`, or `default` when the input is absent."""
    if raw is None:
        return default
    values = _strings(name, raw, limits)
    if len(values) != 1 or values[0] not in allowed:
        raise InvalidRequest(name, f"must be one of {list(allowed)}, got {list(values)}")
    return values[0]


def _scalar(field: str, value: np.ndarray) -> float | int:
    arr = np.asarray(value)
    if arr.size != 1:
        raise InvalidRequest(field, f"must be a single value of shape [1], got shape {list(arr.shape)}")
    item = arr.reshape(-1)[0]
    if isinstance(item, (bytes, str, np.bytes_, np.str_)) or arr.dtype == object:
        raise InvalidRequest(field, "must be numeric, got a string")
    return item.item()


def _int_in(field: str, value: np.ndarray | None, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    item = _scalar(field, value)
    if isinstance(item, float):
        if not math.isfinite(item) or item != int(item):
            raise InvalidRequest(field, f"must be an integer in [{lo}, {hi}], got {item}")
        item = int(item)
    if not lo <= item <= hi:
        raise InvalidRequest(field, f"must be in [{lo}, {hi}], got {item}")
    return int(item)


def _float_in(field: str, value: np.ndarray | None, default: float, lo: float, hi: float) -> float:
    if value is None:
        return default
    item = float(_scalar(field, value))
    if not math.isfinite(item) or not lo <= item <= hi:
        raise InvalidRequest(field, f"must be a finite number in [{lo}, {hi}], got {item}")
    return item


def _match_batch(field: str, values: tuple[str, ...] | None, batch: int) -> tuple[str, ...] | None:
    if values is None or len(values) == batch:
        return values
    if len(values) == 1:
        return values * batch
    raise InvalidRequest(field, f"must hold 1 or {batch} strings (one per prompt), got {len(values)}")


def validate_request(
    inputs: Mapping[str, np.ndarray | None],
    info: FluxModelInfo,
    limits: ServingLimits | None = None,
    loras: Collection[str] = (),
    step_cache: bool = True,
) -> GenerationRequest:
    """Check raw client inputs (numpy arrays by input name) and fill in defaults. `loras` are
    the adapters this server has (a request may name only those); `step_cache`, whether its DiT
    serves first-block caching (the PyTorch runtime does; ONNX and TensorRT graphs do not)."""
    limits = limits or ServingLimits()
    unknown = sorted(set(inputs) - KNOWN_FIELDS)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown input; accepted inputs are {sorted(KNOWN_FIELDS)}")
    if info.is_flux2:
        _refuse_flux1_fields(inputs)
    if inputs.get("prompt") is None:
        raise InvalidRequest("prompt", "is required: a BYTES tensor [N] of N >= 1 prompts")
    prompts = _strings("prompt", inputs["prompt"], limits)
    strings = {f: _strings(f, inputs[f], limits) for f in STRING_FIELDS
               if f != "prompt" and inputs.get(f) is not None}
    prompts_2 = _match_batch("prompt_2", strings.get("prompt_2"), len(prompts)) or prompts
    negative = _match_batch("negative_prompt", strings.get("negative_prompt"), len(prompts))
    negative_2 = _match_batch("negative_prompt_2", strings.get("negative_prompt_2"), len(prompts))
    if negative_2 is not None and negative is None:
        raise InvalidRequest("negative_prompt_2", "needs `negative_prompt` as well")
    if negative is not None and negative_2 is None:
        negative_2 = negative

    multiple = info.spatial_multiple
    edit = _image_inputs(inputs, info, limits, len(prompts))
    default_height, default_width = info.default_height, info.default_width
    if edit.image is not None and info.is_flux2:  # the first reference image's size
        default_height, default_width = images.flux2_reference_size(*edit.image.shape[1:3], multiple)
    elif edit.image is not None:  # the output takes the image's size
        default_height, default_width = images.default_size(*edit.image.shape[1:3], multiple)
    height = _int_in("height", inputs.get("height"), default_height, multiple, limits.max_height)
    width = _int_in("width", inputs.get("width"), default_width, multiple, limits.max_width)
    for field, size in (("height", height), ("width", width)):
        if size % multiple:
            raise InvalidRequest(field, f"must be a multiple of {multiple}, got {size}")
    reference_pixels = 0
    if edit.image is not None and info.is_flux2:  # FLUX.2's references, each at their own size
        ref_h, ref_w = images.flux2_reference_size(*edit.image.shape[1:3], multiple)
        reference_pixels = ref_h * ref_w * edit.image.shape[0]
    elif edit.image is not None and edit.image_role == "reference":
        # FluxKontextPipeline: the output at max_area pixels, with the aspect asked for
        height, width = images.kontext_output_size(height, width, info.max_area, multiple)
        for field, size, most in (("height", height, limits.max_height),
                                  ("width", width, limits.max_width)):
            if not multiple <= size <= most:
                raise InvalidRequest(field, f"a Kontext output keeps the aspect asked for at "
                                     f"{info.max_area} pixels: here {height} x {width}, whose {field} "
                                     f"is outside [{multiple}, {most}]; ask for a squarer size")
        ref_h, ref_w = images.kontext_reference_size(*edit.image.shape[1:3], info.max_area, multiple)
        reference_pixels = ref_h * ref_w

    max_images = max(1, limits.max_batch // len(prompts))
    if len(prompts) > limits.max_batch:
        raise InvalidRequest("prompt", f"at most {limits.max_batch} prompts, got {len(prompts)}")
    num_images = _int_in("num_images_per_prompt", inputs.get("num_images_per_prompt"), 1, 1, max_images)
    max_seq = _int_in(
        "max_sequence_length", inputs.get("max_sequence_length"),
        info.default_max_sequence_length, 1, info.max_text_length,
    )
    guidance = _float_in("guidance_scale", inputs.get("guidance_scale"), info.default_guidance_scale,
                         0.0, 100.0)
    true_cfg = _float_in("true_cfg_scale", inputs.get("true_cfg_scale"), 1.0, 0.0, 100.0)

    sigmas = None
    if inputs.get("sigmas") is not None:
        raw = np.asarray(inputs["sigmas"])
        if raw.dtype == object or raw.dtype.kind not in "fiu":
            raise InvalidRequest("sigmas", "must be FP32 numbers")
        flat = raw.reshape(-1).astype(np.float64)
        if not 1 <= flat.size <= limits.max_inference_steps:
            raise InvalidRequest(
                "sigmas", f"must hold 1 to {limits.max_inference_steps} values, got {flat.size}"
            )
        if not np.all(np.isfinite(flat)) or np.any(flat <= 0) or np.any(flat > 1):
            raise InvalidRequest("sigmas", "every value must be finite and in (0, 1]")
        if np.any(np.diff(flat) > 0):
            raise InvalidRequest("sigmas", "must be non-increasing (noise level falls each step)")
        sigmas = tuple(float(s) for s in raw.reshape(-1))
    steps_default = len(sigmas) if sigmas is not None else info.default_num_inference_steps
    steps = _int_in("num_inference_steps", inputs.get("num_inference_steps"), steps_default, 1,
                    limits.max_inference_steps)
    if sigmas is not None and steps != len(sigmas):
        raise InvalidRequest(
            "num_inference_steps", f"must equal the number of `sigmas` ({len(sigmas)}), got {steps}"
        )
    count = len(prompts) * num_images
    work = (height * width + reference_pixels) * steps * count  # a Kontext reference's tokens too
    if work > limits.max_pixel_steps:
        terms, sizes = "height × width", f"{height} × {width}"
        if reference_pixels:
            terms, sizes = "(height × width + reference pixels)", f"({height} × {width} + {reference_pixels})"
        raise InvalidRequest(
            "num_inference_steps",
            f"the request's work, {terms} × num_inference_steps × images ({len(prompts)} "
            f"prompts × num_images_per_prompt) = {sizes} × {steps} × {count} = {work}, "
            f"is over this server's max_pixel_steps {limits.max_pixel_steps}: lower the size, the "
            "steps or the number of images")
    if edit.image is not None and edit.image_role == "init":
        if steps - sampling.strength_start(steps, edit.strength) < 1:
            raise InvalidRequest(
                "strength", f"at {edit.strength} leaves no step of {steps} to run (it runs "
                "num_inference_steps × strength of them): raise `strength` or `num_inference_steps`")

    if inputs.get("seed") is None:
        seed = secrets.randbelow(SEED_RANGE[1] + 1)
    else:
        seed = _int_in("seed", inputs["seed"], 0, *SEED_RANGE)

    deadline = None
    if inputs.get("deadline_ms") is not None:
        deadline = _int_in("deadline_ms", inputs["deadline_ms"], 0, *DEADLINE_RANGE_MS)

    for spec in BLS_INPUTS:
        if spec.replaced_by and inputs.get(spec.name) is not None:
            raise InvalidRequest(spec.name, f"is no longer accepted: send {spec.replaced_by}")

    preview_kind = _choice("preview_kind", inputs.get("preview_kind"), PREVIEW_KINDS, "latent",
                           limits)

    adapters = _loras(inputs, limits, loras)
    cache_threshold = _float_in("cache_threshold", inputs.get("cache_threshold"), 0.0,
                                *CACHE_THRESHOLD_RANGE)
    if cache_threshold > 0 and info.is_flux2:
        raise InvalidRequest("cache_threshold", "does not apply to this server's FLUX.2 model: "
                             "first-block caching is served for FLUX.1 models only; send 0 or "
                             "leave it out")
    if cache_threshold > 0 and not step_cache:
        raise InvalidRequest("cache_threshold", "needs the PyTorch runtime (BACKEND=torch); this "
                             "server's DiT is an ONNX or TensorRT graph: send 0 or leave it out")

    return GenerationRequest(
        prompts=prompts,
        prompts_2=prompts_2,
        negative_prompts=negative,
        negative_prompts_2=negative_2,
        height=height,
        width=width,
        num_inference_steps=steps,
        num_images_per_prompt=num_images,
        max_sequence_length=max_seq,
        guidance_scale=guidance,
        true_cfg_scale=true_cfg,
        seed=seed,
        sigmas=sigmas,
        deadline_ms=deadline,
        preview_kind=preview_kind,
        loras=adapters,
        image=edit.image,
        mask=edit.mask,
        strength=edit.strength,
        image_role=edit.image_role,
        cache_threshold=cache_threshold,
    )


# What a FLUX.2 model does not take, and why: the client sends what the message says instead.
FLUX2_REFUSED = {
    "prompt_2": "FLUX.2 has one text encoder: send the whole prompt as `prompt`",
    "negative_prompt": "FLUX.2 takes no negative prompt (klein base models guide against the "
                       "empty prompt by `guidance_scale`)",
    "negative_prompt_2": "FLUX.2 takes no negative prompt",
    "true_cfg_scale": "FLUX.2 has no true CFG: `guidance_scale` is its guidance",
    "lora": "LoRA adapters are served for FLUX.1 models only",
    "lora_scale": "LoRA adapters are served for FLUX.1 models only",
    "mask": "FLUX.2's pipelines take reference images, not inpainting masks",
    "strength": "FLUX.2's reference images are not noised",
}


def _refuse_flux1_fields(inputs: Mapping[str, np.ndarray | None]) -> None:
    for field, reason in FLUX2_REFUSED.items():
        if inputs.get(field) is not None:
            raise InvalidRequest(field, f"does not apply to this server's FLUX.2 model: {reason}")


def asks_listing(list_loras: np.ndarray | None) -> bool:
    """Whether a `list_loras` input asks for the adapters: one BOOL, true (InvalidRequest if it
    is not one BOOL)."""
    if list_loras is None:
        return False
    flag = np.asarray(list_loras)
    if flag.size != 1 or flag.dtype != np.bool_:
        raise InvalidRequest("list_loras", f"must be one BOOL value, got {flag.dtype} {list(flag.shape)}")
    return bool(flag.reshape(-1)[0])


def listing_requested(inputs: Mapping[str, np.ndarray | None]) -> bool:
    """Whether a request asks for the LoRA adapters (`list_loras` true), and nothing else."""
    if not asks_listing(inputs.get("list_loras")):
        return False
    others = sorted(name for name, value in inputs.items() if value is not None and name != "list_loras")
    if others:
        raise InvalidRequest("list_loras", f"comes alone (it generates nothing), got {others} too")
    return True


def _loras(inputs: Mapping[str, np.ndarray | None], limits: ServingLimits,
           available: Collection[str]) -> tuple[tuple[str, float], ...]:
    """The LoRA adapters a request names, each with its scale."""
    if inputs.get("lora") is None:
        if inputs.get("lora_scale") is not None:
            raise InvalidRequest("lora_scale", "needs `lora`: one scale for each adapter named there")
        return ()
    names = _strings("lora", inputs["lora"], limits)
    if len(names) > limits.max_loras:
        raise InvalidRequest("lora", f"at most {limits.max_loras} adapters, got {len(names)}")
    if len(set(names)) != len(names):
        raise InvalidRequest("lora", f"names each adapter once, got {list(names)}")
    unknown = [name for name in names if name not in available]
    if unknown:
        raise InvalidRequest("lora", f"unknown adapter {unknown[0]!r}; this server has "
                             f"{sorted(available) or 'none'}")
    scales = (1.0,) * len(names)
    if inputs.get("lora_scale") is not None:
        raw = np.asarray(inputs["lora_scale"])
        if raw.dtype == object or raw.dtype.kind not in "fiu":
            raise InvalidRequest("lora_scale", "must be FP32 numbers")
        flat = raw.reshape(-1).astype(np.float64)
        if flat.size != len(names):
            raise InvalidRequest("lora_scale", f"must hold one scale per adapter in `lora` "
                                 f"({len(names)}), got {flat.size}")
        if not np.all(np.isfinite(flat)) or np.any(np.abs(flat) > LORA_SCALE_LIMIT):
            raise InvalidRequest("lora_scale", f"every scale must be a finite number in "
                                 f"[-{LORA_SCALE_LIMIT}, {LORA_SCALE_LIMIT}], got {flat.tolist()}")
        scales = tuple(float(s) for s in raw.reshape(-1))
    return tuple(zip(names, scales))


@dataclass(frozen=True)
class _ImageInputs:
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float = DEFAULT_STRENGTH
    image_role: str = "init"


def _flux2_references(inputs: Mapping[str, np.ndarray | None], image: np.ndarray,
                      limits: ServingLimits) -> _ImageInputs:
    """A FLUX.2 request's reference images, checked as Flux2ImageProcessor.check_image_input
    checks them: every one joins every prompt's sequence (multi-reference editing)."""
    count, height, width, _ = image.shape
    if not 1 <= count <= limits.max_reference_images:
        raise InvalidRequest("image", f"a FLUX.2 model takes 1 to {limits.max_reference_images} reference "
                             f"images, got {count}")
    for name, size, most in (("height", height, limits.max_height), ("width", width, limits.max_width)):
        if not images.FLUX2_MIN_SIDE <= size <= most:
            raise InvalidRequest("image", f"{name} must be in [{images.FLUX2_MIN_SIDE}, {most}] "
                                 f"pixels, got {size}")
    if max(height / width, width / height) > images.FLUX2_MAX_ASPECT:
        raise InvalidRequest("image", f"aspect ratio must be at most {images.FLUX2_MAX_ASPECT}:1, "
                             f"got {width} x {height}")
    role = _choice("image_role", inputs.get("image_role"), IMAGE_ROLES, "reference", limits)
    if role != "reference":
        raise InvalidRequest("image_role", "a FLUX.2 model takes its images as references (its "
                             "pipelines have no image-to-image): send `reference` or leave it out")
    return _ImageInputs(image, None, DEFAULT_STRENGTH, "reference")


def _uint8(field: str, value: np.ndarray, dims: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        raise InvalidRequest(field, f"must be UINT8 {dims}, got {arr.dtype}")
    if arr.ndim != ndim:
        raise InvalidRequest(field, f"must be UINT8 {dims}, got shape {list(arr.shape)}")
    return arr


def _image_inputs(inputs: Mapping[str, np.ndarray | None], info: FluxModelInfo,
                  limits: ServingLimits, prompts: int) -> _ImageInputs:
    """`image`, `mask`, `strength` and `image_role`, checked against each other."""
    if inputs.get("image") is None:
        for field in ("mask", "strength", "image_role"):
            if inputs.get(field) is not None:
                raise InvalidRequest(field, "applies to an input image: send `image` as well")
        return _ImageInputs()
    image = _uint8("image", inputs["image"], "[N, H, W, 3] (RGB)", 4)
    count, height, width, channels = image.shape
    if channels != 3:
        raise InvalidRequest("image", f"must be UINT8 [N, H, W, 3] (RGB), got {channels} channels")
    if info.is_flux2:
        return _flux2_references(inputs, image, limits)
    if count not in (1, prompts):
        raise InvalidRequest("image", f"must hold 1 image or one per prompt ({prompts}), got {count}")
    multiple = info.spatial_multiple
    for name, size, most in (("height", height, limits.max_height), ("width", width, limits.max_width)):
        if not multiple <= size <= most:
            raise InvalidRequest("image", f"{name} must be in [{multiple}, {most}] pixels, got {size}")

    role = _choice("image_role", inputs.get("image_role"), IMAGE_ROLES, "init", limits)
    if role == "reference" and not info.kontext:
        raise InvalidRequest("image_role", "`reference` edits with a FLUX.1 Kontext model; this "
                             "server's model is not one: send `init` (image-to-image)")

    mask = None
    if inputs.get("mask") is not None:
        if role == "reference":
            raise InvalidRequest("mask", "applies to image_role `init` (inpainting), not `reference`")
        mask = _uint8("mask", inputs["mask"], "[N, H, W] (255 repaint, 0 keep)", 3)
        if mask.shape[1:] != (height, width):
            raise InvalidRequest("mask", f"must have the image's size {height} x {width}, got "
                                 f"{mask.shape[1]} x {mask.shape[2]}")
        if mask.shape[0] not in (1, count):
            raise InvalidRequest("mask", f"must hold 1 mask or one per image ({count}), got {mask.shape[0]}")

    strength = DEFAULT_STRENGTH
    if inputs.get("strength") is not None:
        if role == "reference":
            raise InvalidRequest("strength", "applies to image_role `init`; a `reference` image is "
                                 "not noised")
        strength = _float_in("strength", inputs["strength"], DEFAULT_STRENGTH, 0.0, 1.0)
        if strength <= 0:
            raise InvalidRequest("strength", f"must be in (0, 1], got {strength}")
    return _ImageInputs(image, mask, strength, role)
