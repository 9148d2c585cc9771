"""What the serving code needs to know about a diffusers FLUX folder, read from its JSON files.

Nothing here loads weights: the BLS, the validator and the exporter all read the same description.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SERVING_DEFAULTS_FILE = "flux_serving.json"

# diffusers' FluxPipeline defaults, used where the model folder records none.
PIPELINE_DEFAULTS = {
    "default_height": 1024,
    "default_width": 1024,
    "default_num_inference_steps": 28,
    "default_guidance_scale": 3.5,
    "default_max_sequence_length": 512,
    "max_area": 1024**2,  # FluxKontextPipeline's: the pixels a Kontext output is rescaled to
}
KONTEXT_PIPELINES = ("FluxKontextPipeline",)  # model_index.json classes of Kontext folders
# FLUX.2's pipelines by model_index.json class, with the hidden-state layers their text encoder's
# output is stacked from (the pipelines' `text_encoder_out_layers` defaults).
FLUX2_PIPELINES = {"Flux2KleinPipeline": (9, 18, 27), "Flux2Pipeline": (10, 20, 30)}
# Flux2Pipeline and Flux2KleinPipeline call defaults (`default_sample_size` 128 x the VAE's 8).
FLUX2_PIPELINE_DEFAULTS = {
    "default_height": 1024,
    "default_width": 1024,
    "default_num_inference_steps": 50,
    "default_guidance_scale": 4.0,
    "default_max_sequence_length": 512,
}

UNSUPPORTED_SCHEDULER_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
    "use_flow_sigmas",
)


@dataclass(frozen=True)
class SchedulerConfig:
    """The FlowMatchEulerDiscreteScheduler settings that shape the sigma schedule."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"


@dataclass(frozen=True)
class FluxModelInfo:
    """Shapes, scheduler and defaults of one FLUX model folder."""

    model_dir: Path
    scheduler: SchedulerConfig
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float
    guidance_embeds: bool
    clip_max_length: int
    clip_hidden_size: int
    t5_hidden_size: int
    t5_max_length: int
    default_height: int
    default_width: int
    default_num_inference_steps: int
    default_guidance_scale: float
    default_max_sequence_length: int
    kontext: bool = False  # a FLUX.1 Kontext folder: edits a reference image (image_role reference)
    max_area: int = 1024**2
    dit_width: int = 3072  # the DiT's hidden size: attention heads x head dim
    dit_heads: int = 24  # the DiT's attention heads
    family: str = "flux1"  # flux1 (CLIP + T5) or flux2 (one chat LLM encoder)
    pipeline_class: str = "FluxPipeline"  # model_index.json's class
    text_encoder_layers: tuple[int, ...] = ()  # FLUX.2: hidden states stacked into the embeddings
    is_distilled: bool = False  # FLUX.2 klein: step-distilled, so no classifier-free guidance
    text_embed_dim: int = 4096  # width of the prompt embeddings the DiT takes (T5's; FLUX.2's stack)
    max_text_length: int = 512  # most text tokens a request may ask for (max_sequence_length)

    @property
    def is_flux2(self) -> bool:
        return self.family == "flux2"

    @property
    def guidance_is_cfg(self) -> bool:
        """FLUX.2 klein's base (not step-distilled) models: `guidance_scale` > 1 runs
        classifier-free guidance against the empty prompt (two DiT calls a step)."""
        return self.pipeline_class == "Flux2KleinPipeline" and not self.is_distilled

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor times the 2x2 packing)."""
        return self.vae_scale_factor * 2


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: expected a diffusers FLUX folder (FluxPipeline.save_pretrained layout)"
        ) from None


def load_model_info(model_dir: str | Path) -> FluxModelInfo:
    """Read a diffusers FLUX folder's configs; raise ValueError for schedulers we do not reproduce."""
    root = Path(model_dir).resolve()
    scheduler = _scheduler_config(root)
    index = _read_json(root / "model_index.json")
    if index.get("_class_name", "") in FLUX2_PIPELINES:
        return _flux2_info(root, scheduler, index)
    return _flux1_info(root, scheduler, index)


def _scheduler_config(root: Path) -> SchedulerConfig:
    sched_raw = _read_json(root / "scheduler" / "scheduler_config.json")
    enabled = [flag for flag in UNSUPPORTED_SCHEDULER_FLAGS if sched_raw.get(flag)]
    if enabled:
        raise ValueError(f"{root}: scheduler options {enabled} are not supported by this server")
    known = SchedulerConfig.__dataclass_fields__
    scheduler = SchedulerConfig(**{k: v for k, v in sched_raw.items() if k in known})
    if scheduler.time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"{root}: unknown scheduler time_shift_type {scheduler.time_shift_type!r}")
    return scheduler


def _serving_defaults(root: Path, pipeline_defaults: dict) -> dict:
    defaults = dict(pipeline_defaults)
    serving_file = root / SERVING_DEFAULTS_FILE
    if serving_file.exists():
        defaults.update(json.loads(serving_file.read_text()))
    return defaults


def _flux1_info(root: Path, scheduler: SchedulerConfig, index: dict) -> FluxModelInfo:
    transformer = _read_json(root / "transformer" / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    clip = _read_json(root / "text_encoder" / "config.json")
    t5 = _read_json(root / "text_encoder_2" / "config.json")
    clip_tok = _read_json(root / "tokenizer" / "tokenizer_config.json")
    t5_tok = _read_json(root / "tokenizer_2" / "tokenizer_config.json")
    pipeline_class = index.get("_class_name", "")
    defaults = _serving_defaults(root, PIPELINE_DEFAULTS)
    t5_max_length = min(512, int(t5_tok.get("model_max_length", 512)))

    return FluxModelInfo(
        model_dir=root,
        scheduler=scheduler,
        latent_channels=transformer["in_channels"] // 4,
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        vae_scaling_factor=float(vae["scaling_factor"]),
        vae_shift_factor=float(vae.get("shift_factor") or 0.0),
        guidance_embeds=bool(transformer.get("guidance_embeds", False)),
        clip_max_length=int(clip_tok.get("model_max_length", 77)),
        clip_hidden_size=int(clip["hidden_size"]),
        t5_hidden_size=int(t5["d_model"]),
        t5_max_length=t5_max_length,
        default_height=int(defaults["default_height"]),
        default_width=int(defaults["default_width"]),
        default_num_inference_steps=int(defaults["default_num_inference_steps"]),
        default_guidance_scale=float(defaults["default_guidance_scale"]),
        default_max_sequence_length=int(defaults["default_max_sequence_length"]),
        kontext=pipeline_class in KONTEXT_PIPELINES,
        max_area=int(defaults["max_area"]),
        dit_width=int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"]),
        dit_heads=int(transformer["num_attention_heads"]),
        pipeline_class=pipeline_class,
        text_embed_dim=int(t5["d_model"]),
        max_text_length=t5_max_length,
    )


def _flux2_info(root: Path, scheduler: SchedulerConfig, index: dict) -> FluxModelInfo:
    """A FLUX.2 folder (Flux2Pipeline or Flux2KleinPipeline): one text encoder whose stacked hidden
    states are the prompt embeddings, no pooled embedding, a VAE whose latents are normalised by
    its batch-norm statistics (weights, not config) after 2x2 patching."""
    pipeline_class = index["_class_name"]
    transformer = _read_json(root / "transformer" / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    defaults = _serving_defaults(root, FLUX2_PIPELINE_DEFAULTS)
    return FluxModelInfo(
        model_dir=root,
        scheduler=scheduler,
        latent_channels=transformer["in_channels"] // 4,
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        vae_scaling_factor=1.0,
        vae_shift_factor=0.0,
        guidance_embeds=bool(transformer.get("guidance_embeds", True)),
        clip_max_length=0,
        clip_hidden_size=0,
        t5_hidden_size=0,
        t5_max_length=0,
        default_height=int(defaults["default_height"]),
        default_width=int(defaults["default_width"]),
        default_num_inference_steps=int(defaults["default_num_inference_steps"]),
        default_guidance_scale=float(defaults["default_guidance_scale"]),
        default_max_sequence_length=int(defaults["default_max_sequence_length"]),
        dit_width=int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"]),
        dit_heads=int(transformer["num_attention_heads"]),
        family="flux2",
        pipeline_class=pipeline_class,
        text_encoder_layers=FLUX2_PIPELINES[pipeline_class],
        is_distilled=bool(index.get("is_distilled", False)),
        text_embed_dim=int(transformer["joint_attention_dim"]),
        max_text_length=512,  # the pipelines' tokenizer_max_length
    )
