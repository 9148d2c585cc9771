"""The tensor interface of every served model, declared once.

Triton configs are rendered from these specs, the component adapters read and write tensors by
these names, and the tests check the served models against them. A dim is an int or a symbolic
axis name (rendered as -1).
"""

from __future__ import annotations

from dataclasses import dataclass

from flux_triton.model_info import FluxModelInfo

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton type without the TYPE_ prefix: FP32, BF16, INT64, BYTES, ...
    dims: tuple[Dim, ...]
    optional: bool = False
    replaced_by: str | None = None  # a retired input: what to send instead (refused, naming it)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def batched_inputs(self) -> set[str]:
        """Inputs whose first dim is the batch (split together when a batch is halved)."""
        return {t.name for t in self.inputs if t.dims[:1] in (("B",), ("N",))}


TORCH_DTYPES = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16"}
# Serving precisions and the type of the tensors between models for each: FP8 runs the DiT's Linear
# layers in float8 inside the model and takes and gives bf16 like BF16.
PRECISIONS = ("FP32", "FP16", "BF16", "FP8")
IO_DTYPES = {"FP32": "FP32", "FP16": "FP16", "BF16": "BF16", "FP8": "BF16"}
# The FLUX networks: the four of text-to-image, and the VAE's encoder for image inputs.
NETWORKS = ("clip_encoder", "t5_encoder", "dit_transformer", "vae_decoder", "vae_encoder")
COMPONENTS = ("tokenizer", *NETWORKS)
# FLUX.2's: one chat-model text encoder instead of CLIP and T5.
FLUX2_NETWORKS = ("text_encoder", "dit_transformer", "vae_decoder", "vae_encoder")
ALL_NETWORKS = (*NETWORKS, "text_encoder")  # of either family


def networks(info: FluxModelInfo) -> tuple[str, ...]:
    """The networks of `info`'s family."""
    return FLUX2_NETWORKS if info.is_flux2 else NETWORKS


def components(info: FluxModelInfo) -> tuple[str, ...]:
    """The served components of `info`'s family: the tokenizer and the networks."""
    return ("tokenizer", *networks(info))
# The networks a LoRA adapter may change (diffusers' FLUX loader: the transformer and CLIP), and
# what each of their calls says about it when served by Python models: the adapters and their
# scales, in order (none: the folder's own weights).
ADAPTED_NETWORKS = ("clip_encoder", "dit_transformer")
ADAPTER_INPUTS = (TensorSpec("lora", "BYTES", ("K",), optional=True),
                  TensorSpec("lora_scale", "FP32", ("K",), optional=True))


# Every component served as a Python model also takes `probe`: a request with it is answered at
# once, with no outputs, by the model's own execute. The supervisor sends one to each model now and
# then (its other inputs as small as their specs allow, zeros), and a model whose execute does not
# answer in time is stuck (`flux_triton.server.supervisor`).
PROBE_INPUT = TensorSpec("probe", "BOOL", (1,), optional=True)


def probed(spec: ComponentSpec) -> ComponentSpec:
    """`spec` with the `probe` input."""
    return ComponentSpec(spec.name, (*spec.inputs, PROBE_INPUT), spec.outputs)


# The DiT's first-block cache state (`step_cache_tensors`), by name.
CACHE_STATE = ("cache_head_residual", "cache_tail_residual", "cache_tail_encoder_residual")


def step_cache_tensors(info: FluxModelInfo, dtype: str) -> tuple[tuple[TensorSpec, ...],
                                                                  tuple[TensorSpec, ...]]:
    """The DiT's first-block caching (diffusers' FirstBlockCacheConfig), its state carried by the
    caller from one step's call to the next: given `cache_threshold`, a call runs the first block,
    and the others only when its residual moved by more than the threshold since the last call
    that ran them; else it adds their cached residual. The state inputs are absent at a request's
    first step; the outputs are the state after the call (unchanged where it skipped) and whether
    it ran every block. (inputs, outputs)."""
    tokens = dict(zip(CACHE_STATE, ("S_img", "S_img", "S_txt")))

    def state(optional: bool) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(name, dtype, ("B", tokens[name], info.dit_width), optional)
                     for name in CACHE_STATE)
    return ((TensorSpec("cache_threshold", "FP32", (1,), optional=True), *state(True)),
            (*state(False), TensorSpec("cache_computed", "BOOL", ("B",))))


def python_model_spec(spec: ComponentSpec, network: str, info: FluxModelInfo | None = None,
                      step_cache: bool = False) -> ComponentSpec:
    """`network`'s interface as a Python model serves it (`spec` may name a per-GPU copy): with
    the `probe` input; the networks a LoRA adapter changes also take the adapter inputs; with
    `step_cache` (the PyTorch runtime), the DiT also its first-block cache (`step_cache_tensors`,
    of `info`)."""
    inputs, outputs = spec.inputs, spec.outputs
    flux1 = info is None or not info.is_flux2  # FLUX.2 serves neither adapters nor the cache
    if network in ADAPTED_NETWORKS and flux1:
        inputs += ADAPTER_INPUTS
    if network == "dit_transformer" and step_cache and flux1:
        cache_inputs, cache_outputs = step_cache_tensors(info, spec.input("hidden_states").dtype)
        inputs, outputs = inputs + cache_inputs, outputs + cache_outputs
    return probed(ComponentSpec(spec.name, inputs, outputs))


def component_specs(info: FluxModelInfo, precision: str = "FP32") -> dict[str, ComponentSpec]:
    """Specs of tokenizer, clip_encoder, t5_encoder, dit_transformer, vae_decoder, vae_encoder,
    encode_prompt,
    with the floating-point tensors in the type `precision` serves them in (see IO_DTYPES)."""
    if precision not in IO_DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = IO_DTYPES[precision]
    if info.is_flux2:
        return flux2_component_specs(info, dtype)
    packed_channels = info.latent_channels * 4
    dit_inputs = [
        TensorSpec("hidden_states", dtype, ("B", "S_img", packed_channels)),
        TensorSpec("encoder_hidden_states", dtype, ("B", "S_txt", info.t5_hidden_size)),
        TensorSpec("pooled_projections", dtype, ("B", info.clip_hidden_size)),
        TensorSpec("timestep", dtype, ("B",)),
        TensorSpec("img_ids", dtype, ("S_img", 3)),
        TensorSpec("txt_ids", dtype, ("S_txt", 3)),
    ]
    if info.guidance_embeds:
        dit_inputs.append(TensorSpec("guidance", "FP32", ("B",)))
    prompt_inputs = (
        TensorSpec("prompt", "BYTES", ("N",)),
        TensorSpec("prompt_2", "BYTES", ("N",)),
        TensorSpec("max_sequence_length", "INT32", (1,)),
    )
    pooled = TensorSpec("pooled_prompt_embeds", dtype, ("N", info.clip_hidden_size))
    sequence = TensorSpec("prompt_embeds", dtype, ("N", "S_txt", info.t5_hidden_size))
    specs = [
        ComponentSpec(
            "tokenizer",
            prompt_inputs,
            (
                TensorSpec("clip_input_ids", "INT64", ("N", info.clip_max_length)),
                TensorSpec("t5_input_ids", "INT64", ("N", "S_txt")),
            ),
        ),
        ComponentSpec(
            "clip_encoder",
            (TensorSpec("input_ids", "INT64", ("N", info.clip_max_length)),),
            (pooled,),
        ),
        ComponentSpec(
            "t5_encoder",
            (TensorSpec("input_ids", "INT64", ("N", "S_txt")),),
            (sequence,),
        ),
        ComponentSpec(
            "dit_transformer",
            tuple(dit_inputs),
            (TensorSpec("noise_pred", dtype, ("B", "S_img", packed_channels)),),
        ),
        ComponentSpec(
            "vae_decoder",
            (TensorSpec("latents", dtype, ("B", info.latent_channels, "H_lat", "W_lat")),),
            (TensorSpec("image", dtype, ("B", 3, "H", "W")),),
        ),
        # The encoder with its latent normalisation: (mean + std * noise - shift) * scale, where
        # `noise` is the posterior's standard-normal draw (zeros: the mean, diffusers' "argmax").
        ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", dtype, ("B", 3, "H", "W")),
             TensorSpec("noise", dtype, ("B", info.latent_channels, "H_lat", "W_lat"))),
            (TensorSpec("latents", dtype, ("B", info.latent_channels, "H_lat", "W_lat")),),
        ),
        ComponentSpec("encode_prompt", prompt_inputs, (pooled, sequence)),
    ]
    return {s.name: s for s in specs}


def flux2_component_specs(info: FluxModelInfo, dtype: str) -> dict[str, ComponentSpec]:
    """FLUX.2's components: the chat tokenizer and text encoder, the DiT (no pooled embedding;
    position ids of 4 axes, int64), and the VAE on patched, normalised latents [B, C*4, h/2, w/2]."""
    packed_channels = info.latent_channels * 4
    token_ids = (TensorSpec("input_ids", "INT64", ("N", "S_txt")),
                 TensorSpec("attention_mask", "INT64", ("N", "S_txt")))
    prompt_inputs = (TensorSpec("prompt", "BYTES", ("N",)),
                     TensorSpec("max_sequence_length", "INT32", (1,)))
    embeds = TensorSpec("prompt_embeds", dtype, ("N", "S_txt", info.text_embed_dim))
    dit_inputs = [
        TensorSpec("hidden_states", dtype, ("B", "S_img", packed_channels)),
        TensorSpec("encoder_hidden_states", dtype, ("B", "S_txt", info.text_embed_dim)),
        TensorSpec("timestep", dtype, ("B",)),
        TensorSpec("img_ids", "INT64", ("S_img", 4)),
        TensorSpec("txt_ids", "INT64", ("S_txt", 4)),
    ]
    if info.guidance_embeds:
        dit_inputs.append(TensorSpec("guidance", "FP32", ("B",)))
    patched = TensorSpec("latents", dtype, ("B", packed_channels, "H_tok", "W_tok"))
    image = TensorSpec("image", dtype, ("B", 3, "H", "W"))
    specs = [
        ComponentSpec("tokenizer", prompt_inputs, token_ids),
        ComponentSpec("text_encoder", token_ids, (embeds,)),
        ComponentSpec("dit_transformer", tuple(dit_inputs),
                      (TensorSpec("noise_pred", dtype, ("B", "S_img", packed_channels)),)),
        ComponentSpec("vae_decoder", (patched,), (image,)),
        ComponentSpec("vae_encoder", (image,), (patched,)),
        ComponentSpec("encode_prompt", prompt_inputs, (embeds,)),
    ]
    return {s.name: s for s in specs}


def preview_dims(info: FluxModelInfo) -> tuple[Dim, ...]:
    """A step's preview latents: the VAE's latent grid (FLUX.1), or the patched grid FLUX.2's
    latents live on."""
    if info.is_flux2:
        return ("B", info.latent_channels * 4, "H_tok", "W_tok")
    return ("B", info.latent_channels, "H_lat", "W_lat")


@dataclass(frozen=True)
class ServingShape:
    """A request shape the server prepares at load: compiled kernels and a CUDA graph for it, so
    no request of that shape waits for compilation. Written `BxHxWxS` (batch, height, width,
    max_sequence_length), e.g. `1x1024x1024x512`; `+reference` after it is the same request
    editing a reference image of that size (Kontext: twice the image tokens in the DiT)."""

    batch: int
    height: int
    width: int
    max_sequence_length: int
    reference: bool = False

    @classmethod
    def parse(cls, text: str) -> ServingShape:
        body, plus, suffix = text.lower().partition("+")
        try:
            if plus and suffix != "reference":
                raise ValueError
            batch, height, width, seq = (int(part) for part in body.split("x"))
        except ValueError:
            raise ValueError("a serving shape is BxHxWxS (e.g. 1x1024x1024x512), optionally with "
                             f"+reference (e.g. 1x1024x1024x512+reference), got {text!r}") from None
        return cls(batch, height, width, seq, bool(plus))

    def __str__(self) -> str:
        text = f"{self.batch}x{self.height}x{self.width}x{self.max_sequence_length}"
        return text + ("+reference" if self.reference else "")

    def axis_sizes(self, info: FluxModelInfo) -> dict[str, int]:
        """The size of every symbolic axis of the component specs at this shape (one image per
        prompt; a reference image, if any, of the output's size)."""
        lat_h = 2 * (self.height // (info.vae_scale_factor * 2))
        lat_w = 2 * (self.width // (info.vae_scale_factor * 2))
        tokens = (lat_h // 2) * (lat_w // 2)
        return {"B": self.batch, "N": self.batch, "S_img": tokens * (2 if self.reference else 1),
                "S_txt": self.max_sequence_length, "H_lat": lat_h, "W_lat": lat_w,
                "H_tok": lat_h // 2, "W_tok": lat_w // 2,
                "H": lat_h * info.vae_scale_factor, "W": lat_w * info.vae_scale_factor}


def default_serving_shape(info: FluxModelInfo) -> ServingShape:
    """One image at the model folder's default size and text length."""
    return ServingShape(1, info.default_height, info.default_width, info.default_max_sequence_length)


def default_serving_shapes(info: FluxModelInfo) -> tuple[ServingShape, ...]:
    """The shapes a server prepares unless told others: the default one, and for a Kontext model
    the same editing a reference image of that size."""
    shape = default_serving_shape(info)
    if info.kontext:
        return shape, ServingShape(shape.batch, shape.height, shape.width,
                                   shape.max_sequence_length, reference=True)
    return (shape,)


# The public request of `flux_bls`, declared once: the rendered config, the validator
# (`request.validate_request`) and the clients (`flux_triton.clients.stream_client.build_inputs`) all read it.
# Every input but `prompt` is optional; N is the number of prompts, N_steps of sigmas.
BLS_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("prompt", "BYTES", ("N",)),
    TensorSpec("prompt_2", "BYTES", ("N",), optional=True),
    TensorSpec("negative_prompt", "BYTES", ("N",), optional=True),
    TensorSpec("negative_prompt_2", "BYTES", ("N",), optional=True),
    TensorSpec("height", "INT32", (1,), optional=True),
    TensorSpec("width", "INT32", (1,), optional=True),
    TensorSpec("num_inference_steps", "INT32", (1,), optional=True),
    TensorSpec("num_images_per_prompt", "INT32", (1,), optional=True),
    TensorSpec("max_sequence_length", "INT32", (1,), optional=True),
    TensorSpec("deadline_ms", "INT32", (1,), optional=True),
    TensorSpec("guidance_scale", "FP32", (1,), optional=True),
    TensorSpec("true_cfg_scale", "FP32", (1,), optional=True),
    TensorSpec("seed", "INT64", (1,), optional=True),
    TensorSpec("sigmas", "FP32", ("N_steps",), optional=True),
    TensorSpec("preview_kind", "BYTES", (1,), optional=True),
    TensorSpec("lora", "BYTES", ("K",), optional=True),  # LoRA adapters by name, K <= max_loras
    TensorSpec("lora_scale", "FP32", ("K",), optional=True),  # their scales (default 1.0 each)
    TensorSpec("list_loras", "BOOL", (1,), optional=True),  # alone: answer the adapters, generate nothing
    # Image inputs: one image, or one per prompt; a mask (255 repaint, 0 keep) makes image-to-image
    # inpainting; `image_role` reference is Kontext editing (the image's tokens join the sequence).
    TensorSpec("image", "UINT8", ("N_image", "H_image", "W_image", 3), optional=True),
    TensorSpec("mask", "UINT8", ("N_mask", "H_image", "W_image"), optional=True),
    TensorSpec("strength", "FP32", (1,), optional=True),
    TensorSpec("image_role", "BYTES", (1,), optional=True),
    # The fast tier: first-block caching at this threshold (0, the default: off, every step run)
    TensorSpec("cache_threshold", "FP32", (1,), optional=True),
    TensorSpec("previews", "BOOL", (1,), optional=True,
               replaced_by="`preview_kind`: `none` for no previews, else latent, x0 or both"),
)
# The values a fixed-width number type holds: a client checks before it converts (numpy would wrap
# an INT32 or round a huge FP32 to infinity silently).
NUMBER_RANGES = {"INT32": (-2**31, 2**31 - 1), "INT64": (-2**63, 2**63 - 1),
                 "FP32": (-3.4028234663852886e38, 3.4028234663852886e38)}

# `cache_threshold` compares a relative change of the first block's residual with it; past 1
# nearly every step would be skipped.
CACHE_THRESHOLD_RANGE = (0.0, 1.0)

# What each step's response carries: no preview ("none"), the latents reached ("latent", the
# server's default), the clean image the model predicts from them ("x0"), or both.
PREVIEW_KINDS = ("none", "latent", "x0", "both")

# What an input image is: the start of image-to-image (or of inpainting, with a mask), or the
# reference a Kontext model edits.
IMAGE_ROLES = ("init", "reference")


def bls_input(name: str) -> TensorSpec:
    """The declaration of one `flux_bls` input; KeyError naming the accepted ones otherwise."""
    for spec in BLS_INPUTS:
        if spec.name == name:
            return spec
    raise KeyError(f"flux_bls has no input {name!r}; its inputs are {[s.name for s in BLS_INPUTS]}")


def bls_spec(info: FluxModelInfo) -> ComponentSpec:
    """The public streaming interface of `flux_bls`."""
    outputs = (
        TensorSpec("step", "INT32", (1,)),
        TensorSpec("total_steps", "INT32", (1,)),
        TensorSpec("timestep", "FP32", (1,)),
        TensorSpec("preview_latent", "FP32", preview_dims(info)),
        TensorSpec("preview_x0", "FP32", preview_dims(info)),
        TensorSpec("image", "UINT8", ("B", "H", "W", 3)),
        TensorSpec("seed", "INT64", (1,)),
        TensorSpec("timings", "BYTES", (1,)),
        TensorSpec("steps_completed", "INT32", (1,)),
        TensorSpec("partial", "BOOL", (1,)),
        TensorSpec("loras", "BYTES", (1,)),  # the answer to `list_loras`: the adapters, as JSON
        # a request waiting in line (MAX_INFLIGHT): its place, 1 = next, before its first step and
        # again whenever it changes
        TensorSpec("queue_position", "INT32", (1,)),
    )
    return ComponentSpec("flux_bls", BLS_INPUTS, outputs)
