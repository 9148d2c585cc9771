"""`make train-lora`: train a LoRA adapter of the embedded default model on a GPU, in minutes.

The `outline` adapter teaches the shapes model what its captions never say: every shape drawn as
an outline. The same captions, images of outlined shapes; the base transformer, the text encoders
and the VAE stay frozen, only rank-`rank` factors on every attention and MLP Linear of the DiT
learn, under the rectified-flow objective the model was trained with. The adapter is written as
`FluxPipeline.save_lora_weights` writes it, to `<model folder>/loras/<name>/`, with a training log.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline

from devtools.shapes import all_scenes
from devtools.train_shapes import (
    TrainingConfig,
    _autocast,
    _device_name,
    _lr_factor,
    encode_dataset,
    flow_batch,
)
from flux_triton.model_info import load_model_info
from flux_triton.runtime.torch_components import ClipEncoder, DitTransformer, PromptTokenizer, T5Encoder
from flux_triton.sampling import latent_image_ids, text_ids

# The DiT's attention and MLP Linear layers, as peft matches module names (by their ends).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
           "proj_out")


@dataclass(frozen=True)
class LoraTraining:
    """What decides a LoRA run (kept in the adapter's training log)."""

    name: str = "outline"
    rank: int = 16
    steps: int = 40000
    batch: int = 512
    lr: float = 1.5e-3
    warmup_steps: int = 200
    images_per_caption: int = 96
    max_minutes: float = 5.0
    seed: int = 0


def train_lora(model_dir: str | Path, config: LoraTraining, device: str,
               out_dir: str | Path | None = None) -> Path:
    """Train the adapter and write it to `out_dir` (default `<model_dir>/loras/<name>`)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if config.name != "outline":
        raise ValueError(f"the shapes world teaches one adapter, `outline`; got {config.name!r}")
    model_dir = Path(model_dir)
    info = load_model_info(model_dir)
    began = time.perf_counter()
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # as for the base model's training
        torch.backends.cuda.matmul.allow_tf32 = True
    base = TrainingConfig(size=info.default_height, images_per_caption=config.images_per_caption,
                          max_sequence_length=info.default_max_sequence_length, seed=config.seed)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", dtype=torch.float32).to(device).eval()
    dataset = encode_dataset(vae, base, device, outline=True)
    del vae
    captions = [scene.caption for scene in all_scenes()]
    ids = PromptTokenizer(model_dir, info)(captions, captions, base.max_sequence_length)
    with torch.no_grad():
        pooled = ClipEncoder(model_dir, torch.float32, device).to(device)(
            ids["clip_input_ids"].to(device))["pooled_prompt_embeds"]
        prompt_embeds = T5Encoder(model_dir, torch.float32, device).to(device)(
            ids["t5_input_ids"].to(device))["prompt_embeds"]
    dit = DitTransformer(model_dir, torch.float32, device).to(device)
    dit.requires_grad_(False)
    dit.model.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=list(TARGETS),
                                     init_lora_weights="gaussian"), adapter_name=config.name)
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(config.seed + 1)
    side = base.size // info.vae_scale_factor
    img_ids = latent_image_ids(side, side, device, torch.float32)
    txt_ids = text_ids(base.max_sequence_length, device, torch.float32)
    deadline = time.perf_counter() + config.max_minutes * 60
    step, started, losses = 0, time.perf_counter(), []
    dit.train()
    while step < config.steps and time.perf_counter() < deadline:
        progress = max(step / config.steps, (time.perf_counter() - started) / (deadline - started))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config.warmup_steps, progress)
        index, noisy, sigma, target = flow_batch(dataset, config.batch, info, generator)
        with _autocast(device):
            velocity = dit(noisy, prompt_embeds[index], pooled[index], sigma, img_ids, txt_ids)["noise_pred"]
        loss = (velocity.float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item() if step % 50 == 0 else None)
        step += 1
        if step % 1000 == 0:
            recent = [v for v in losses[-1000:] if v is not None]
            print(f"lora step {step}: loss {sum(recent) / len(recent):.4f}", flush=True)
    dit.eval()
    out = Path(out_dir) if out_dir else model_dir / "loras" / config.name
    out.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().to("cpu", torch.float16).contiguous()
              for k, v in get_peft_model_state_dict(dit.model, adapter_name=config.name).items()}
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=layers)
    recent = [v for v in losses[-2000:] if v is not None]
    log = {"config": asdict(config), "model_dir": str(model_dir), "device": _device_name(device),
           "steps": step, "seconds": round(time.perf_counter() - began, 1),
           "final_loss": round(sum(recent) / max(1, len(recent)), 5),
           "trainable_parameters": sum(p.numel() for p in params)}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"lora: {log}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/shapes-flux"))
    parser.add_argument("--out", type=Path, default=None, help="default: <model dir>/loras/<name>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, field in LoraTraining.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = vars(parser.parse_args(argv))
    model_dir, out, device = args.pop("model_dir"), args.pop("out"), args.pop("device")
    print(train_lora(model_dir, LoraTraining(**args), device, out))


if __name__ == "__main__":
    main()
