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
    sched_raw = _read_json(root / "scheduler" / "scheduler_config.json")
    enabled = [flag for flag in UNSUPPORTED_SCHEDULER_FLAGS if sched_raw.get(flag)]
    if enabled:
        raise ValueError(f"{root}: scheduler options {enabled} are not supported by this server")
    known = SchedulerConfig.__dataclass_fields__
    scheduler = SchedulerConfig(**{k: v for k, v in sched_raw.items() if k in known})
    if scheduler.time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"{root}: unknown scheduler time_shift_type {scheduler.time_shift_type!r}")

    transformer = _read_json(root / "transformer" / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    clip = _read_json(root / "text_encoder" / "config.json")
    t5 = _read_json(root / "text_encoder_2" / "config.json")
    clip_tok = _read_json(root / "tokenizer" / "tokenizer_config.json")
    t5_tok = _read_json(root / "tokenizer_2" / "tokenizer_config.json")
    pipeline_class = _read_json(root / "model_index.json").get("_class_name", "")
    defaults = dict(PIPELINE_DEFAULTS)
    serving_file = root / SERVING_DEFAULTS_FILE
    if serving_file.exists():
        defaults.update(json.loads(serving_file.read_text()))

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
        t5_max_length=min(512, int(t5_tok.get("model_max_length", 512))),
        default_height=int(defaults["default_height"]),
        default_width=int(defaults["default_width"]),
        default_num_inference_steps=int(defaults["default_num_inference_steps"]),
        default_guidance_scale=float(defaults["default_guidance_scale"]),
        default_max_sequence_length=int(defaults["default_max_sequence_length"]),
        kontext=pipeline_class in KONTEXT_PIPELINES,
        max_area=int(defaults["max_area"]),
        dit_width=int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"]),
    )
