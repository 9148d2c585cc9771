"""FLUX.1's and FLUX.2's real architectures with random weights, for benchmarks without the weights.

`write_full_size_folder` writes a diffusers-layout folder holding the real component configs (no
weights) and a `random_weights.json` marker; `flux_triton.runtime.torch_components.load_component`
then builds each network from its config with random bf16 weights directly on the device, so
compute and memory are the real ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from flux_triton.model_info import SERVING_DEFAULTS_FILE
from flux_triton.runtime.torch_components import RANDOM_WEIGHTS_MARKER

TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56],
}
CLIP_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
T5_XXL = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096,
    "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu", "is_gated_act": True,
    "dense_act_fn": "gelu_new", "layer_norm_epsilon": 1e-06, "tie_word_embeddings": False,
}
VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu", "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
}
SCHEDULERS = {
    "schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096},
}
SERVING = {
    "schnell": {"default_height": 1024, "default_width": 1024, "default_num_inference_steps": 4,
                "default_max_sequence_length": 256, "default_guidance_scale": 0.0},
    "dev": {"default_height": 1024, "default_width": 1024, "default_num_inference_steps": 28,
            "default_max_sequence_length": 512, "default_guidance_scale": 3.5},
}


# FLUX.2: the transformers of klein 4B (5 double + 20 single blocks, 3072 wide), klein 9B (8 + 24,
# 4096) and dev (8 + 48, 6144; Flux2Transformer2DModel's defaults), their text encoders (Qwen3 4B,
# Qwen3 8B, Mistral Small 3.1 24B with its vision tower) and the 32-channel VAE.
FLUX2_TRANSFORMERS = {
    "flux2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24,
                           joint_attention_dim=7680, guidance_embeds=False),
    "flux2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32,
                           joint_attention_dim=12288, guidance_embeds=False),
    "flux2-dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48,
                      joint_attention_dim=15360, guidance_embeds=True),
}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
         "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000,
         "rms_norm_eps": 1e-06, "hidden_act": "silu"}
FLUX2_TEXT_ENCODERS = {
    "flux2-klein-4b": dict(QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
    "flux2-klein-9b": dict(QWEN3, hidden_size=4096, intermediate_size=12288,
                           tie_word_embeddings=False),
    "flux2-dev": {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
        "image_token_index": 10, "spatial_merge_size": 2, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False, "vision_feature_layer": -1,
        "text_config": {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120,
                        "intermediate_size": 32768, "num_hidden_layers": 40,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "max_position_embeddings": 131072, "rope_theta": 1000000000.0,
                        "rms_norm_eps": 1e-05, "sliding_window": None},
        "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64,
                          "image_size": 1540, "patch_size": 14, "rope_theta": 10000.0},
    },
}
FLUX2_VAE = {"_class_name": "AutoencoderKLFlux2", "latent_channels": 32,
             "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
             "norm_num_groups": 32, "use_quant_conv": True, "use_post_quant_conv": True}
FLUX2_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                   "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                   "time_shift_type": "exponential"}
SERVING.update({
    "flux2-klein-4b": {"default_height": 1024, "default_width": 1024,
                       "default_num_inference_steps": 4, "default_max_sequence_length": 512,
                       "default_guidance_scale": 1.0},
    "flux2-klein-9b": {"default_height": 1024, "default_width": 1024,
                       "default_num_inference_steps": 4, "default_max_sequence_length": 512,
                       "default_guidance_scale": 1.0},
    "flux2-dev": {"default_height": 1024, "default_width": 1024,
                  "default_num_inference_steps": 28, "default_max_sequence_length": 512,
                  "default_guidance_scale": 4.0},
})
FLUX2_VARIANTS = tuple(FLUX2_TRANSFORMERS)


def write_flux2_full_size_folder(out_dir: str | Path, variant: str,
                                 tokenizers_from: str | Path) -> Path:
    """A FLUX.2 folder (`variant` of FLUX2_VARIANTS) with real configs, no weights, and the tiny
    FLUX.2 folder's tokenizer of the same family (its ids are valid in the real vocabulary)."""
    out = Path(out_dir)
    klein = variant != "flux2-dev"
    configs = {
        "transformer/config.json": dict(_class_name="Flux2Transformer2DModel", in_channels=128,
                                        attention_head_dim=128, **FLUX2_TRANSFORMERS[variant]),
        "text_encoder/config.json": FLUX2_TEXT_ENCODERS[variant],
        "vae/config.json": FLUX2_VAE,
        "scheduler/scheduler_config.json": FLUX2_SCHEDULER,
        SERVING_DEFAULTS_FILE: SERVING[variant],
        RANDOM_WEIGHTS_MARKER: {"init": "normal(0, 0.02) for Linear weights", "dtype": "bfloat16"},
    }
    for relative, config in configs.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text(json.dumps(config, indent=2))
    source = Path(tokenizers_from) / ("tiny-flux2-klein" if klein else "tiny-flux2-dev")
    shutil.copytree(source / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    index = json.loads((source / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def write_full_size_folder(out_dir: str | Path, variant: str, tokenizers_from: str | Path) -> Path:
    """A FLUX.1-`variant` folder with real configs, no weights, and tokenizers copied over (FLUX.2
    variants: `write_flux2_full_size_folder`, its tokenizer from `models/`)."""
    if variant in FLUX2_VARIANTS:
        return write_flux2_full_size_folder(out_dir, variant, "models")
    out = Path(out_dir)
    configs = {
        "transformer/config.json": dict(TRANSFORMER, guidance_embeds=variant == "dev"),
        "text_encoder/config.json": CLIP_TEXT,
        "text_encoder_2/config.json": T5_XXL,
        "vae/config.json": VAE,
        "scheduler/scheduler_config.json": SCHEDULERS[variant],
        SERVING_DEFAULTS_FILE: SERVING[variant],
        RANDOM_WEIGHTS_MARKER: {"init": "normal(0, 0.02) for Linear weights", "dtype": "bfloat16"},
    }
    for relative, config in configs.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text(json.dumps(config, indent=2))
    source = Path(tokenizers_from)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(source / name, out / name, dirs_exist_ok=True)
    index = json.loads((source / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def diffusers_pipeline(info, device: str, dtype: str, parts: dict | None = None):
    """diffusers' FluxPipeline over the networks `load_component` loads from a folder (real or
    random weights): the reference the served pipeline is compared with."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from flux_triton.runtime.torch_components import load_component
    from flux_triton.specs import COMPONENTS

    parts = parts or {name: load_component(name, info, device, dtype) for name in COMPONENTS}
    scheduler_config = json.loads((info.model_dir / "scheduler" / "scheduler_config.json").read_text())
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        vae=parts["vae_decoder"].model, text_encoder=parts["clip_encoder"].model,
        tokenizer=parts["tokenizer"].clip, text_encoder_2=parts["t5_encoder"].model,
        tokenizer_2=parts["tokenizer"].t5, transformer=parts["dit_transformer"].model,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_flux2_pipeline(info, parts: dict):
    """diffusers' Flux2KleinPipeline or Flux2Pipeline over the networks `load_component` loads (the
    text encoder whole: the served one runs only up to the last layer it reads)."""
    import diffusers

    from flux_triton.runtime.torch_components import _network, _text_encoder_class

    scheduler_config = json.loads((info.model_dir / "scheduler" / "scheduler_config.json").read_text())
    device = next(parts["dit_transformer"].model.parameters()).device
    dtype = next(parts["dit_transformer"].model.parameters()).dtype
    text_encoder = _network(_text_encoder_class(info.model_dir), info.model_dir, "text_encoder",
                            dtype, str(device))
    pipeline_class = getattr(diffusers, info.pipeline_class)
    extra = {"is_distilled": info.is_distilled} if info.pipeline_class == "Flux2KleinPipeline" else {}
    pipe = pipeline_class(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        vae=parts["vae_decoder"].model, text_encoder=text_encoder,
        tokenizer=parts["tokenizer"].tokenizer, transformer=parts["dit_transformer"].model, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """--variant and --tokenizers-from: what `write_full_size_folder` needs."""
    parser.add_argument("--variant", choices=["schnell", "dev", *FLUX2_VARIANTS], default="schnell")
    parser.add_argument("--tokenizers-from", default="models/tiny-flux-schnell")


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The command line the full-size GPU benchmarks share: folder, batch sizes, runs, output."""
    parser = argparse.ArgumentParser(description=description)
    add_folder_arguments(parser)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    add_folder_arguments(parser)
    args = parser.parse_args(argv)
    print(write_full_size_folder(args.out, args.variant, args.tokenizers_from))


if __name__ == "__main__":
    main()
