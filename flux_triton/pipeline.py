"""FluxPipeline.__call__ (and Flux2Pipeline's, Flux2KleinPipeline's) as one async generator over
abstract model calls.

The Triton BLS implements `FluxModels` with BLS requests, the in-process runner with torch modules;
both run this same code, so they stream the same steps and the same image.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flux_triton import images, sampling
from flux_triton.model_info import FluxModelInfo
from flux_triton.recovery import ComponentError
from flux_triton.request import GenerationRequest
from flux_triton.specs import CACHE_STATE


class StageFailed(RuntimeError):
    """A component failed during a named stage of the pipeline (e.g. `step_3`)."""

    def __init__(self, stage: str, cause: ComponentError):
        super().__init__(f"{cause.model} failed during {stage}: {cause.message}")
        self.stage = stage
        self.model = cause.model
        self.cause = cause


class Stop(enum.Enum):
    """What stops a request early."""

    CANCELLED = "cancelled"  # the client went away: nothing more is sent
    DEADLINE = "deadline"  # its deadline passed: the image of the last step reached


StopCheck = Callable[[], Stop | None]
Adapters = tuple[tuple[str, float], ...]  # LoRA adapters by name, with their scales, in order


class FluxModels(Protocol):
    """The component calls the pipeline needs; each returns tensors on the serving device."""

    async def tokenize(
        self, prompts: tuple[str, ...], prompts_2: tuple[str, ...], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP ids of `prompts` [N, 77] and T5 ids of `prompts_2` [N, S] (int64)."""
        ...

    async def clip_encoder(self, input_ids: torch.Tensor, adapters: Adapters = ()) -> torch.Tensor:
        """CLIP pooled output [N, D_clip], with the LoRA `adapters` (name, scale) active."""
        ...

    async def t5_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        """T5 last hidden states [N, S, D_t5]."""
        ...

    async def tokenize_chat(self, prompts: tuple[str, ...], max_sequence_length: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX.2: ids and attention mask [N, S] (int64) of `prompts` in the chat template."""
        ...

    async def text_encoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """FLUX.2: the prompt embeddings [N, S, D] (stacked hidden states)."""
        ...

    async def dit_transformer(self, inputs: dict[str, torch.Tensor],
                              adapters: Adapters = ()) -> torch.Tensor:
        """Velocity prediction [B, S_img, C*4] for the DiT inputs (`dit_inputs`), with the LoRA
        `adapters` (name, scale) active."""
        ...

    async def dit_transformer_cached(self, inputs: dict[str, torch.Tensor],
                                     adapters: Adapters = ()) -> dict[str, torch.Tensor]:
        """`dit_transformer` with its first-block cache (`cache_threshold` and the state in
        `inputs`): the outputs of `specs.step_cache_tensors` beside `noise_pred`. Not merged with
        other requests' calls: whether to skip is decided for the call's rows together."""
        ...

    async def vae_decoder(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded image [B, 3, H, W] in [-1, 1]."""
        ...

    async def vae_encoder(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised latents [B, C, H/8, W/8] of images [B, 3, H, W] in [-1, 1]: the posterior's
        mean + std * `noise` (zeros: its mean). FLUX.2 (no `noise`): the posterior's mode,
        patched and normalised, [B, C*4, H/16, W/16]."""
        ...


@dataclass
class StageTimer:
    """Wall-clock spans of the stages of one request, in seconds since its start."""

    start: float = field(default_factory=time.perf_counter)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def timed(self, name: str, awaitable):
        begin = self.now()
        try:
            return await awaitable
        except ComponentError as exc:
            raise StageFailed(name, exc) from exc
        finally:
            self.spans[name] = (begin, self.now())

    def spans_ms(self) -> dict[str, list[float]]:
        """[start, end] of each stage in milliseconds since the request started."""
        return {k: [round(a * 1000, 3), round(b * 1000, 3)] for k, (a, b) in self.spans.items()}


@dataclass
class FirstBlockCache:
    """One request's first-block cache for one kind of its DiT calls (diffusers keeps the
    prompt's and the negative prompt's apart): the state each call hands the next."""

    threshold: float
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: int = 0
    skipped: int = 0  # calls that ran only the first block

    async def call(self, models: FluxModels, inputs: dict[str, torch.Tensor],
                   adapters: Adapters) -> torch.Tensor:
        threshold = torch.tensor([self.threshold], dtype=torch.float32)
        outputs = await models.dit_transformer_cached(
            dict(inputs, cache_threshold=threshold, **self.state), adapters)
        self.state = {name: outputs[name] for name in CACHE_STATE}
        self.calls += 1
        self.skipped += not bool(outputs["cache_computed"].reshape(-1)[0])
        return outputs["noise_pred"]


def cache_report(caches: list[FirstBlockCache]) -> dict:
    """What a cached request's response says of its DiT calls."""
    return {"threshold": caches[0].threshold, "dit_calls": sum(c.calls for c in caches),
            "dit_calls_skipped": sum(c.skipped for c in caches)}


@dataclass(frozen=True)
class PromptEmbeddings:
    pooled: torch.Tensor | None  # [B, D_clip]; FLUX.2 has none
    sequence: torch.Tensor  # [B, S, D_t5] (FLUX.2: [B, S, D] of its text encoder)
    text_ids: torch.Tensor  # [S, 3] (FLUX.2: [S, 4], int64)


@dataclass(frozen=True)
class StepUpdate:
    """Sent after every denoising step."""

    step: int  # 1-based
    total_steps: int
    timestep: float
    preview_latent: torch.Tensor | None  # [B, C, H/8, W/8] float32 unpacked latents, if asked for
    seconds: float  # wall time of this step
    preview_x0: torch.Tensor | None = None  # [B, C, H/8, W/8] float32 predicted clean latents


@dataclass(frozen=True)
class FinalImage:
    """Sent once, after the last step."""

    image: torch.Tensor  # [B, H, W, 3] uint8
    seed: int
    timings: StageTimer
    steps_completed: int
    partial: bool  # True when a deadline cut the loop short: the image of the last step reached
    cache: dict | None = None  # with first-block caching: `cache_report`


async def encode_prompts(
    models: FluxModels,
    prompts: tuple[str, ...],
    prompts_2: tuple[str, ...],
    request: GenerationRequest,
    timer: StageTimer,
    tag: str,
    info: FluxModelInfo | None = None,
) -> PromptEmbeddings:
    """Tokenize, then CLIP and T5 concurrently; repeat per image (FluxPipeline.encode_prompt).
    FLUX.2: tokenize in the chat template, then its one text encoder (Flux2Pipeline.encode_prompt)."""
    if info is not None and info.is_flux2:
        ids, mask = await timer.timed(f"tokenize{tag}",
                                      models.tokenize_chat(prompts, request.max_sequence_length))
        sequence = await timer.timed(f"text_encoder{tag}", models.text_encoder(ids, mask))
        return PromptEmbeddings(
            pooled=None, sequence=sampling.repeat_per_image(sequence, request.num_images_per_prompt),
            text_ids=sampling.flux2_text_ids(sequence.shape[1], sequence.device))
    clip_ids, t5_ids = await timer.timed(
        f"tokenize{tag}", models.tokenize(prompts, prompts_2, request.max_sequence_length)
    )
    pooled, sequence = await asyncio.gather(
        timer.timed(f"clip_encoder{tag}", models.clip_encoder(clip_ids, request.loras)),
        timer.timed(f"t5_encoder{tag}", models.t5_encoder(t5_ids)),
    )
    n = request.num_images_per_prompt
    return PromptEmbeddings(
        pooled=sampling.repeat_per_image(pooled, n),
        sequence=sampling.repeat_per_image(sequence, n),
        text_ids=sampling.text_ids(sequence.shape[1], pooled.device, pooled.dtype),
    )


def dit_inputs(
    latents: torch.Tensor,
    timestep: torch.Tensor,
    guidance: torch.Tensor | None,
    embeds: PromptEmbeddings,
    image_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The DiT's inputs by name (the `dit_transformer` tensor interface)."""
    inputs = {
        "hidden_states": latents,
        "encoder_hidden_states": embeds.sequence,
        "pooled_projections": embeds.pooled,
        "timestep": timestep,
        "img_ids": image_ids,
        "txt_ids": embeds.text_ids,
    }
    if embeds.pooled is None:  # FLUX.2
        del inputs["pooled_projections"]
    if guidance is not None:
        inputs["guidance"] = guidance
    return inputs


@dataclass
class ImageConditioning:
    """What a request's input image becomes: the latents an image-to-image run starts from (and,
    inpainting, the packed latent mask and the tensors it blends), or Kontext's reference tokens
    and their position ids."""

    init_latents: torch.Tensor | None = None  # [B, C, H/8, W/8]
    mask: torch.Tensor | None = None  # [B, S, C*4]: 1 where the model paints
    packed_init: torch.Tensor | None = None
    packed_noise: torch.Tensor | None = None
    reference: torch.Tensor | None = None  # [B, S_ref, C*4]
    reference_ids: torch.Tensor | None = None  # [S_ref, 3]


async def prepare_image_inputs(
    request: GenerationRequest, info: FluxModelInfo, models: FluxModels,
    generator: torch.Generator, timer: StageTimer, latent_size: tuple[int, int],
    dtype: torch.dtype, device: torch.device,
) -> ImageConditioning | None:
    """Resize, normalise and encode the request's image (and mask) as the diffusers pipeline of
    its role does; an `init` image draws the posterior's noise from `generator` first."""
    if request.image is None:
        return None
    batch = request.batch_size
    if info.is_flux2:
        return await flux2_references(request, info, models, timer, dtype, device)
    if request.edits_reference:
        pixels = await asyncio.to_thread(images.reference_pixels, request.image, info)
        pixels = pixels.to(device=device, dtype=dtype)
        ref_h, ref_w = pixels.shape[2] // info.vae_scale_factor, pixels.shape[3] // info.vae_scale_factor
        mean = torch.zeros((pixels.shape[0], info.latent_channels, ref_h, ref_w), dtype=dtype,
                           device=device)  # Kontext takes the posterior's mean ("argmax")
        latents = await timer.timed("vae_encoder", models.vae_encoder(pixels, mean))
        return ImageConditioning(
            reference=sampling.pack_latents(images.repeat_images(latents, batch)),
            reference_ids=sampling.reference_image_ids(ref_h, ref_w, device, dtype))
    pixels = await asyncio.to_thread(images.image_pixels, request.image, request.height,
                                     request.width, info)
    pixels = pixels.to(device=device, dtype=dtype)
    eps = sampling.standard_normal(
        generator, (pixels.shape[0], info.latent_channels, *latent_size), dtype, device)
    latents = await timer.timed("vae_encoder", models.vae_encoder(pixels, eps))
    conditioning = ImageConditioning(init_latents=images.repeat_images(latents, batch))
    if request.mask is not None:
        mask = await asyncio.to_thread(images.mask_pixels, request.mask, request.height,
                                       request.width, info)
        conditioning.mask = images.packed_mask(mask, *latent_size, batch, info.latent_channels,
                                               dtype, device)
    return conditioning


async def flux2_references(request: GenerationRequest, info: FluxModelInfo, models: FluxModels,
                           timer: StageTimer, dtype: torch.dtype, device: torch.device
                           ) -> ImageConditioning:
    """FLUX.2's reference images as its pipelines prepare them: each encoded on its own, its
    tokens placed at time 10, 20, ... of the position ids, all of them joined to every row."""
    pixels = await asyncio.to_thread(images.flux2_reference_pixels, request.image, info)
    pixels = pixels.to(device=device, dtype=dtype)
    tokens, ids = [], []
    for index in range(pixels.shape[0]):
        latents = await timer.timed(f"vae_encoder_{index + 1}", models.vae_encoder(pixels[index:index + 1]))
        tokens.append(sampling.flux2_pack_latents(latents).squeeze(0))
        ids.append(sampling.flux2_image_ids(latents.shape[2], latents.shape[3], device,
                                            time=10 + 10 * index))
    reference = torch.cat(tokens, dim=0).unsqueeze(0).repeat(request.batch_size, 1, 1)
    return ImageConditioning(reference=reference, reference_ids=torch.cat(ids, dim=0))


async def generate(
    request: GenerationRequest,
    info: FluxModelInfo,
    models: FluxModels,
    stop_check: StopCheck | None = None,
) -> AsyncIterator[StepUpdate | FinalImage]:
    """Run FluxPipeline.__call__ for a validated request; yield each step, then the image.

    `stop_check` runs before every step: Stop.CANCELLED ends the stream at once, Stop.DEADLINE decodes
    the latents reached so far into an image marked partial.
    """
    timer = StageTimer()
    stop_check = stop_check or (lambda: None)

    # 1. Encode the prompt (and the negative prompt for true CFG, or FLUX.2 klein's guidance
    #    against the empty prompt), all encoders at once.
    layout = sampling.LAYOUTS[info.family]
    encodes = [encode_prompts(models, request.prompts, request.prompts_2, request, timer, "", info)]
    if request.do_true_cfg:
        encodes.append(encode_prompts(
            models, request.negative_prompts, request.negative_prompts_2, request, timer, "_negative"
        ))
    elif info.guidance_is_cfg and request.guidance_scale > 1:
        empty = ("",) * len(request.prompts)
        encodes.append(encode_prompts(models, empty, empty, request, timer, "_negative", info))
    embeds, *negative = await timer.timed("encode", asyncio.gather(*encodes))
    negative_embeds = negative[0] if negative else None
    device, dtype = embeds.sequence.device, embeds.sequence.dtype

    # 2. The image inputs, encoded; the noise, drawn after them from the same generator, as the
    #    diffusers pipelines draw both. 3. The schedule: shifted sigmas for this image size.
    batch = request.batch_size
    lat_h, lat_w = sampling.latent_grid(request.height, request.width, info.vae_scale_factor)
    generator = sampling.seeded_generator(request.seed)
    edit = await prepare_image_inputs(request, info, models, generator, timer, (lat_h, lat_w),
                                      dtype, device)
    noise = sampling.standard_normal(
        generator, layout.noise_shape(batch, info.latent_channels, lat_h, lat_w), dtype, device)
    image_ids = layout.image_ids(lat_h, lat_w, device, dtype)
    sigmas = request.sigmas or sampling.default_sigmas(request.num_inference_steps)
    image_seq_len = (lat_h // 2) * (lat_w // 2)
    timesteps, sigma_schedule = sampling.flow_match_schedule(
        sigmas, image_seq_len, info.scheduler,
        layout.shift_mu(image_seq_len, request.num_inference_steps, info.scheduler))
    timesteps, sigma_schedule = timesteps.to(device), sigma_schedule.to(device)
    if edit is None:
        latents = layout.pack(noise)
    elif edit.reference is not None:  # Kontext, FLUX.2: text-to-image's noise and schedule
        latents = layout.pack(noise)
        image_ids = torch.cat([image_ids, edit.reference_ids], dim=0)
    else:  # image-to-image: the last steps of the schedule, from the image noised to their start
        start = sampling.strength_start(request.num_inference_steps, request.strength)
        timesteps, sigma_schedule = timesteps[start:], sigma_schedule[start:]
        latents = sampling.pack_latents(
            sampling.scale_noise(edit.init_latents, noise, sigma_schedule[0]))
        if edit.mask is not None:
            edit.packed_init = sampling.pack_latents(edit.init_latents)
            edit.packed_noise = sampling.pack_latents(noise)
    guidance = (sampling.guidance_vector(request.guidance_scale, batch, device)
                if info.guidance_embeds else None)

    # 4. Denoising loop, one preview per step.
    caches = ([FirstBlockCache(request.cache_threshold) for _ in range(2)]
              if request.cache_threshold > 0 else [None, None])
    steps_completed = 0
    for i, t in enumerate(timesteps):
        stop = stop_check()
        if stop is Stop.CANCELLED:
            return
        if stop is Stop.DEADLINE:
            break
        step_start = timer.now()
        timestep = sampling.dit_timestep(t, batch, latents.dtype)
        tokens = latents
        if edit is not None and edit.reference is not None:
            tokens = torch.cat([latents, edit.reference], dim=1)
        calls = [dit_call(models, dit_inputs(tokens, timestep, guidance, embeds, image_ids),
                          request.loras, caches[0])]
        if negative_embeds is not None:
            calls.append(dit_call(models, dit_inputs(tokens, timestep, guidance, negative_embeds,
                                                     image_ids), request.loras, caches[1]))
        noise_pred, *neg = await timer.timed(f"step_{i + 1}", asyncio.gather(*calls))
        if tokens is not latents:  # the prediction for the output's tokens only
            noise_pred, neg = noise_pred[:, :latents.shape[1]], [n[:, :latents.shape[1]] for n in neg]
        if neg:
            scale = request.guidance_scale if info.is_flux2 else request.true_cfg_scale
            noise_pred = sampling.true_cfg(noise_pred, neg[0], scale)
        x0 = None
        if request.preview_kind in ("x0", "both"):
            x0 = layout.unpack(
                sampling.predicted_clean(noise_pred, latents, sigma_schedule, i), lat_h, lat_w)
        latents = sampling.euler_step(noise_pred, latents, sigma_schedule, i)
        if edit is not None and edit.mask is not None:  # inpainting: what is kept, noised to match
            kept = edit.packed_init
            if i < len(timesteps) - 1:
                kept = sampling.scale_noise(kept, edit.packed_noise, sigma_schedule[i + 1])
            latents = (1 - edit.mask) * kept + edit.mask * latents
        preview = (layout.unpack(latents, lat_h, lat_w).to(torch.float32)
                   if request.preview_kind in ("latent", "both") else None)
        steps_completed = i + 1
        yield StepUpdate(step=i + 1, total_steps=len(timesteps), timestep=float(t),
                         preview_latent=preview, seconds=timer.now() - step_start, preview_x0=x0)

    # 5. Decode (also what a deadline returns: the latents of the last completed step).
    if stop_check() is Stop.CANCELLED:
        return
    vae_latents = layout.unpack(latents, lat_h, lat_w)
    if not info.is_flux2:  # FLUX.2's decoder undoes its own normalisation
        vae_latents = sampling.to_vae_latents(vae_latents, info.vae_scaling_factor,
                                              info.vae_shift_factor)
    decoded = await timer.timed("vae_decoder", models.vae_decoder(vae_latents))
    image = sampling.postprocess_uint8(decoded)
    timer.spans["total"] = (0.0, timer.now())
    used = [c for c in caches if c is not None and c.calls]
    yield FinalImage(image=image, seed=request.seed, timings=timer, steps_completed=steps_completed,
                     partial=steps_completed < len(timesteps),
                     cache=cache_report(used) if used else None)


def dit_call(models: FluxModels, inputs: dict[str, torch.Tensor], adapters: Adapters,
             cache: FirstBlockCache | None):
    """One DiT call of a step: through the request's first-block cache where it has one."""
    if cache is None:
        return models.dit_transformer(inputs, adapters)
    return cache.call(models, inputs, adapters)
