"""Tiny random-weight FLUX pipelines for offline tests and smoke runs: FLUX.1 (schnell, dev and
Kontext layouts) and FLUX.2 (klein and dev)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from devtools.model_folders import staged_model_dir, write_serving_defaults
from devtools.tokenizers import (
    build_clip_tokenizer,
    build_mistral_tokenizer,
    build_qwen_tokenizer,
    build_t5_tokenizer,
    train_t5_spm,
)

# kontext: the dev layout saved as a FluxKontextPipeline (the same transformer class), for Kontext
# editing's parity; its untrained weights edit nothing in particular.
FLUX1_VARIANTS = ("schnell", "dev", "kontext")
# FLUX.2: klein (step-distilled, a Qwen3 text encoder) and dev (guidance-distilled, Mistral 3).
FLUX2_VARIANTS = ("flux2-klein", "flux2-dev")
VARIANTS = FLUX1_VARIANTS + FLUX2_VARIANTS


def folder_name(variant: str) -> str:
    """The folder `make model` writes a variant to: tiny-flux-schnell, ..., tiny-flux2-klein."""
    return f"tiny-{variant}" if variant in FLUX2_VARIANTS else f"tiny-flux-{variant}"


def build_tiny_pipeline(variant: str, seed: int, t5_spm_model: bytes) -> FluxPipeline:
    """Assemble a float32 FluxPipeline of tiny components, each seeded in a fixed order."""
    if variant not in FLUX1_VARIANTS:
        raise ValueError(f"variant must be one of {FLUX1_VARIANTS}, got {variant!r}")
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


def build_tiny_flux2_pipeline(variant: str, seed: int) -> Flux2KleinPipeline | Flux2Pipeline:
    """A float32 FLUX.2 pipeline of tiny components, seeded in a fixed order. The text encoders
    have the depth of the released ones (Qwen3 4B: 36 layers, Mistral Small 3.1: 40), past the
    last layer the pipelines read hidden states from (klein 27, dev 30)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    if variant not in FLUX2_VARIANTS:
        raise ValueError(f"variant must be one of {FLUX2_VARIANTS}, got {variant!r}")
    is_dev = variant == "flux2-dev"
    torch.manual_seed(seed)
    if is_dev:
        tokenizer = build_mistral_tokenizer(SYSTEM_MESSAGE)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              head_dim=8, image_size=32, patch_size=8),
            text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=16,
                                      intermediate_size=32, num_hidden_layers=40,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=1024),
            image_token_index=0, spatial_merge_size=2))
    else:
        tokenizer = build_qwen_tokenizer()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=36,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            tie_word_embeddings=True))
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=is_dev)
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(16,) * 4, latent_channels=8, layers_per_block=1, norm_num_groups=8,
        sample_size=128, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # latent statistics that are not the identity, as a trained VAE's
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 transformer=transformer)
    return Flux2Pipeline(**parts) if is_dev else Flux2KleinPipeline(**parts, is_distilled=True)


# The tokenizer classes the FLUX.2 folders name, as the released ones do (klein) or as both
# transformers 4 and 5 load them (dev's is a PixtralProcessor upstream; a tokenizer with the same
# chat template serves the text-only prompts alike).
FLUX2_TOKENIZER_CLASSES = {"flux2-klein": "Qwen2TokenizerFast", "flux2-dev": "PreTrainedTokenizerFast"}


def name_tokenizer_class(folder: Path, class_name: str) -> None:
    """Record `class_name` as the folder's tokenizer class (model_index.json and its config)."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer"] = ["transformers", class_name]
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = class_name
    config_file.write_text(json.dumps(config, indent=2) + "\n")


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
    if variant == "flux2-klein":  # step-distilled: guidance is ignored
        defaults["default_guidance_scale"] = 1.0
    if variant == "flux2-dev":  # the system message comes first
        defaults.update(default_max_sequence_length=160, default_guidance_scale=4.0)
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
    if variant in FLUX2_VARIANTS:
        return build_tiny_flux2(out_dir, variant, seed)
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


def build_tiny_flux2(out_dir: str | Path, variant: str, seed: int = 0) -> Path:
    """Write a tiny FLUX.2 pipeline (see FLUX2_VARIANTS) to `out_dir` and return its path."""
    with torch.random.fork_rng(devices=[]):
        pipeline = build_tiny_flux2_pipeline(variant, seed)
    with staged_model_dir(out_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        name_tokenizer_class(staging, FLUX2_TOKENIZER_CLASSES[variant])
        write_serving_defaults(staging, serving_defaults(variant))
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
    """Command line: python -m devtools.tiny_models --out models --variant <one of VARIANTS>|all."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models"), help="parent folder")
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for variant in VARIANTS if args.variant == "all" else (args.variant,):
        print(build_tiny_flux(args.out / folder_name(variant), variant, args.seed))


if __name__ == "__main__":
    main()
