"""Tiny random-weight FLUX pipelines (schnell and dev layouts) for offline tests and smoke runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from devtools.model_folders import staged_model_dir, write_serving_defaults
from devtools.tokenizers import build_clip_tokenizer, build_t5_tokenizer, train_t5_spm

# kontext: the dev layout saved as a FluxKontextPipeline (the same transformer class), for Kontext
# editing's parity; its untrained weights edit nothing in particular.
VARIANTS = ("schnell", "dev", "kontext")


def build_tiny_pipeline(variant: str, seed: int, t5_spm_model: bytes) -> FluxPipeline:
    """Assemble a float32 FluxPipeline of tiny components, each seeded in a fixed order."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    is_dev = variant in ("dev", "kontext")
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer(t5_spm_model)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=77, vocab_size=len(tokenizer), projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=len(tokenizer_2),
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=is_dev, axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if is_dev else 1.0, use_dynamic_shifting=is_dev,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipeline_class = FluxKontextPipeline if variant == "kontext" else FluxPipeline
    return pipeline_class(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def serving_defaults(variant: str) -> dict[str, float | int]:
    """Request defaults stored next to the pipeline as flux_serving.json (a Kontext output at the
    tiny default's area, not FluxKontextPipeline's 1024**2)."""
    defaults = {
        "default_height": 128,
        "default_width": 128,
        "default_num_inference_steps": 4,
        "default_max_sequence_length": 64,
        "default_guidance_scale": 0.0 if variant == "schnell" else 3.5,
    }
    if variant == "kontext":
        defaults["max_area"] = 128 * 128
    return defaults


# Random LoRA adapters of the tiny models (`<folder>/loras/<name>/`, as FluxPipeline.save_lora_weights
# writes them): the transformer's attention and MLP layers; "texture" also adapts CLIP.
TINY_LORAS = {
    "style": dict(rank=4, alpha=8, transformer=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
                                                "proj_out", "ff.net.0.proj", "ff.net.2"),
                  text_encoder=()),
    "texture": dict(rank=2, alpha=2, transformer=("to_q", "to_v", "proj_mlp"),
                    text_encoder=("q_proj", "v_proj", "fc1")),
}


def build_tiny_flux(out_dir: str | Path, variant: str, seed: int = 0) -> Path:
    """Write a tiny FLUX pipeline (see VARIANTS) and its LoRA adapters to `out_dir` and return
    its path."""
    t5_spm_model = train_t5_spm()
    with torch.random.fork_rng(devices=[]):
        pipeline = build_tiny_pipeline(variant, seed, t5_spm_model)
    with staged_model_dir(out_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / "tokenizer_2" / "spiece.model").write_bytes(t5_spm_model)
        write_serving_defaults(staging, serving_defaults(variant))
        with torch.random.fork_rng(devices=[]):
            for index, (name, spec) in enumerate(TINY_LORAS.items()):
                torch.manual_seed(seed + 100 + index)
                write_random_lora(pipeline, staging / "loras" / name, **spec)
    return Path(out_dir).resolve()


def write_random_lora(pipeline: FluxPipeline, folder: Path, rank: int, alpha: int,
                      transformer: tuple[str, ...], text_encoder: tuple[str, ...]) -> Path:
    """A LoRA adapter of random weights (both matrices: it changes the output) for `pipeline`'s
    transformer (and CLIP), saved as diffusers saves trained ones; the pipeline is left as it was."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    layers = {}
    for part, targets in (("transformer", transformer), ("text_encoder", text_encoder)):
        if not targets:
            continue
        module = getattr(pipeline, part)
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                      init_lora_weights=False), adapter_name="new")
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module, adapter_name="new")
        module.delete_adapters("new") if part == "transformer" else module.delete_adapter("new")
    FluxPipeline.save_lora_weights(folder, **layers)
    return folder


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m devtools.tiny_models --out models --variant schnell|dev|kontext|all."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models"), help="parent folder")
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for variant in VARIANTS if args.variant == "all" else (args.variant,):
        print(build_tiny_flux(args.out / f"tiny-flux-{variant}", variant, args.seed))


if __name__ == "__main__":
    main()
