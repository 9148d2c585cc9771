"""`make train-default`: train the embedded default model, a small FLUX that draws the shapes world.

Builds a FluxPipeline of small components (schnell layout, no guidance embedding), saves it, then
trains the VAE on rendered scenes and, with the VAE frozen, the transformer together with both text
encoders under the rectified-flow objective FLUX uses. The EMA weights are written back as float16
into a diffusers folder, with the trained size, steps and sequence length in `flux_serving.json`.
Runs on a GPU in minutes; on the CPU only as a smoke run (`--vae-steps 2 --dit-steps 2`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from devtools.model_folders import staged_model_dir, write_serving_defaults
from devtools.shapes import accuracy, all_scenes, palette_tensor, render_batch, scene_index
from devtools.tokenizers import (
    CHARACTER_LINES,
    build_clip_tokenizer,
    build_t5_tokenizer,
    spm_model_pb2,
    train_t5_spm,
)
from flux_triton.model_info import load_model_info
from flux_triton.runtime.torch_components import ClipEncoder, DitTransformer, PromptTokenizer, T5Encoder
from flux_triton.sampling import (
    latent_image_ids,
    pack_latents,
    static_shift,
    text_ids,
    to_model_latents,
)

TRAINING_LOG_FILE = "training_log.json"


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides a training run (stored in the model folder's training log)."""

    size: int = 128
    max_sequence_length: int = 16
    num_inference_steps: int = 12
    sampling_shift: float = 3.0  # the scheduler's shift; measured better than 1.0 for colour
    # The same shift applied to the training sigmas (SD3's time shift of the logit-normal draws):
    # 1.0 leaves them centred, so sigmas above 0.9, where a shifted schedule takes several steps
    # and decides the layout, are drawn about 1 % of the time.
    sigma_shift: float = 1.0
    vae_steps: int = 30000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    images_per_caption: int = 384  # encoded once; the transformer samples from their posteriors
    dit_steps: int = 100000
    dit_batch: int = 512
    dit_lr: float = 4e-4
    warmup_steps: int = 500
    ema_decay: float = 0.999
    max_minutes: float = 20.0  # wall-clock budget for both stages together
    vae_minutes: float = 4.0  # at most, and at most half of max_minutes (1.7 min gave 27 dB only)
    compile: bool = True  # torch.compile the networks on a GPU (eager elsewhere)
    # The share of each transformer batch drawn as inpainting states (`inpaint_batch`): 0 trains
    # text-to-image only.
    inpaint_share: float = 0.0
    inpaint_pairs_per_caption: int = 64
    seed: int = 0


def caption_words() -> set[str]:
    return {word for scene in all_scenes() for word in scene.caption.split()}


def whole_word_spm(spm_model: bytes, words: set[str]) -> bytes:
    """Add each word as one piece ("▁word") to a unigram sentencepiece model, scored to win."""
    model_pb2 = spm_model_pb2()
    proto = model_pb2.ModelProto.FromString(spm_model)
    present = {piece.piece for piece in proto.pieces}
    for word in sorted(words):
        if f"▁{word}" not in present:
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = f"▁{word}", 0.0, model_pb2.ModelProto.SentencePiece.NORMAL
    return proto.SerializeToString()


def build_shapes_pipeline(seed: int = 0) -> tuple[FluxPipeline, bytes]:
    """The untrained pipeline and its T5 sentencepiece model; tokenizers know each word whole."""
    words = caption_words()
    captions = [scene.caption for scene in all_scenes()]
    t5_spm = whole_word_spm(train_t5_spm(captions * 4 + CHARACTER_LINES, vocab_size=160), words)
    tokenizer, tokenizer_2 = build_clip_tokenizer(words), build_t5_tokenizer(t5_spm)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=77, vocab_size=len(tokenizer), projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=len(tokenizer_2),
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(16, 24, 24),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, sample_size=128, scaling_factor=1.0,
        shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    return pipeline, t5_spm


def _images(table: torch.Tensor, rows: torch.Tensor, size: int, generator: torch.Generator,
            outline: bool = False) -> torch.Tensor:
    """The scenes of `table[rows]` (see `scene_index`) rendered as images in [-1, 1]."""
    return render_batch(table[rows], size, generator, outline) / 127.5 - 1


def _random_rows(table: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(len(table), (batch,), generator=generator, device=generator.device)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def _lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warmup, then cosine decay to a tenth as `progress` (0..1, steps or time) runs out."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _compile(enabled: bool, *modules: torch.nn.Module) -> None:
    """Compile each module's forward in place (its parameter names, so its checkpoint, stay)."""
    for module in modules if enabled else ():
        module.forward = torch.compile(module.forward)


def _uncompile(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def train_vae(vae: AutoencoderKL, config: TrainingConfig, device: str, deadline: float) -> dict:
    """Reconstruction (L1 + L2) with a small KL term; then set the latent shift and scale."""
    generator = torch.Generator(device).manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    table = scene_index(all_scenes()).to(device)
    vae.to(memory_format=torch.channels_last).train()
    _compile(config.compile and device.startswith("cuda"), vae.encoder, vae.decoder)
    step, began = 0, time.perf_counter()
    while step < config.vae_steps and time.perf_counter() < deadline:
        progress = max(step / config.vae_steps, (time.perf_counter() - began) / (deadline - began))
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, config.warmup_steps, progress)
        images = _images(table, _random_rows(table, config.vae_batch, generator), config.size,
                         generator).contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(posterior.sample(generator)).sample.float()
        error = decoded - images
        loss = error.abs().mean() + error.square().mean() + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 500 == 0:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad(), _autocast(device):
        index = _random_rows(table, 256, generator)
        images = _images(table, index, config.size, generator)
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator).float()
        decoded = vae.decode(posterior.mode()).sample.float().clamp(-1, 1)
    _uncompile(vae.encoder, vae.decoder)
    mse = ((decoded - images) / 2).square().mean().item()
    pixels = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    scenes = [all_scenes()[i] for i in index.tolist()]
    shift, scale = latents.mean().item(), 1 / latents.std().item()
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    stats = {"steps": step, "seconds": round(time.perf_counter() - began, 1),
             "psnr_db": round(10 * math.log10(1 / mse), 2),
             "reconstruction_accuracy": accuracy(list(pixels), scenes),
             "shift_factor": vae.config.shift_factor,
             "scaling_factor": vae.config.scaling_factor}
    print(f"vae: {stats}", flush=True)
    return stats


def encode_dataset(vae: AutoencoderKL, config: TrainingConfig, device: str, outline: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render `images_per_caption` scenes of every caption once (filled, or as outlines) and
    encode them: caption indices [N] and the posterior's mean and std [N, C, h, w] (VAE latent
    space)."""
    generator = torch.Generator(device).manual_seed(config.seed + 2)
    table = scene_index(all_scenes()).to(device)
    index = torch.arange(len(table), device=device).repeat(config.images_per_caption)
    means, stds = [], []
    with torch.no_grad(), _autocast(device):
        for chunk in index.split(256):
            images = _images(table, chunk, config.size, generator, outline)
            posterior = vae.encode(images).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    return index, torch.cat(means), torch.cat(stds)


def training_sigmas(batch: int, generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """[batch] logit-normal sigmas, as in SD3/FLUX training, time-shifted by `shift` (> 1 moves
    them towards noise as the scheduler's shift moves the sampling steps)."""
    sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))
    return static_shift(sigma, shift)


def flow_batch(dataset: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch: int, info,
               generator: torch.Generator, sigma_shift: float = 1.0) -> tuple[torch.Tensor, ...]:
    """A batch for the rectified-flow objective from an encoded dataset (`encode_dataset`):
    caption indices, noisy packed latents, sigmas, and the velocity target (noise - clean)."""
    dataset_index, dataset_mean, dataset_std = dataset
    device = generator.device
    pick = torch.randint(len(dataset_index), (batch,), generator=generator, device=device)
    index, mean, std = dataset_index[pick], dataset_mean[pick], dataset_std[pick]
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=device)
    clean = pack_latents(to_model_latents(latents, info.vae_scaling_factor, info.vae_shift_factor))
    noise = torch.randn(clean.shape, generator=generator, device=device)
    sigma = training_sigmas(clean.shape[0], generator, sigma_shift)
    noisy = (1 - sigma.view(-1, 1, 1)) * clean + sigma.view(-1, 1, 1) * noise
    return index, noisy, sigma, noise - clean


def _shape_cells(images: torch.Tensor, index: torch.Tensor, cell: int) -> torch.Tensor:
    """bool [B, 1, h, w]: the latent cells (`cell` px square) wholly inside each image's shape,
    which an inpainting mask of the background keeps (`devtools.shapes_edits.background_mask`)."""
    palette = palette_tensor(images.device)
    colour = palette[index[:, 1]].view(-1, 3, 1, 1)
    background = palette[index[:, 2]].view(-1, 3, 1, 1)
    # how far each pixel is from the background towards the shape's colour, 0..1
    towards = ((images - background) * (colour - background)).sum(1, keepdim=True)
    shape = towards > 0.5 * (colour - background).square().sum(1, keepdim=True)
    return -torch.nn.functional.max_pool2d(-shape.float(), cell) > 0.5


def encode_inpaint_pairs(vae: AutoencoderKL, config: TrainingConfig, device: str, cell: int
                         ) -> tuple[torch.Tensor, ...]:
    """Pairs of one geometry under two background colours, encoded: target caption indices [N],
    the target's and the source's posterior mean and std [N, C, h, w], and the cells an
    inpainting mask of the background repaints [N, 1, h, w] (1.0 = repaint)."""
    generator = torch.Generator(device).manual_seed(config.seed + 3)
    scenes = all_scenes()
    table = scene_index(scenes).to(device)
    lookup = {tuple(row.tolist()): i for i, row in enumerate(table.cpu())}
    colours = table[:, 1:].max().item() + 1
    index = torch.arange(len(table), device=device).repeat(config.inpaint_pairs_per_caption)
    parts: list[list[torch.Tensor]] = [[] for _ in range(6)]
    with torch.no_grad(), _autocast(device):
        for chunk in index.split(256):
            rows = table[chunk]
            # a source background that is neither the target's nor the shape's colour
            offsets = torch.randint(1, colours - 1, (len(chunk),), generator=generator, device=device)
            other = (rows[:, 2] + offsets) % colours
            other = torch.where(other == rows[:, 1], (other + 1) % colours, other)
            other = torch.where(other == rows[:, 2], (other + 1) % colours, other)
            source = torch.tensor([lookup[(s, c, b)] for s, c, b in
                                   zip(rows[:, 0].tolist(), rows[:, 1].tolist(), other.tolist())],
                                  device=device)
            state = generator.get_state()
            target_images = render_batch(rows, config.size, generator)
            generator.set_state(state)  # the same position and scale
            source_images = render_batch(table[source], config.size, generator)
            keep = _shape_cells(target_images, rows, cell)
            for images, out in ((target_images, parts[1:3]), (source_images, parts[3:5])):
                posterior = vae.encode(images / 127.5 - 1).latent_dist
                out[0].append(posterior.mean.float())
                out[1].append(posterior.std.float())
            parts[0].append(chunk)
            parts[5].append((~keep).float())
    return tuple(torch.cat(part) for part in parts)


def inpaint_batch(pairs: tuple[torch.Tensor, ...], batch: int, info, generator: torch.Generator,
                  sigma_shift: float = 1.0) -> tuple[torch.Tensor, ...]:
    """A batch of the states FluxInpaintPipeline's transformer sees, as `flow_batch` returns them.

    The kept cells follow the source's noising path exactly, as the pipeline blends them in. The
    repainted cells still carry part of the source's old background, λ = σ·u (u uniform): all of
    it at the pipeline's first step, less as it denoises. The target is the velocity whose clean
    estimate (noisy − σ·v) is the target image everywhere, so the model learns to replace the old
    background by the caption's instead of drawing around it.
    """
    index, target_mean, target_std, source_mean, source_std, repaint = pairs
    device = generator.device
    pick = torch.randint(len(index), (batch,), generator=generator, device=device)
    shared = torch.randn(target_mean[pick].shape, generator=generator, device=device)

    def packed(mean, std):  # one posterior draw for both: the kept cells are the same image
        latents = mean[pick] + std[pick] * shared
        return pack_latents(to_model_latents(latents, info.vae_scaling_factor, info.vae_shift_factor))

    target, old = packed(target_mean, target_std), packed(source_mean, source_std)
    mask = pack_latents(repaint[pick].expand(-1, target_mean.shape[1], -1, -1))
    clean = old + mask * (target - old)  # what the pipeline ends with: the kept cells are the source's
    noise = torch.randn(clean.shape, generator=generator, device=device)
    sigma = training_sigmas(batch, generator, sigma_shift).view(-1, 1, 1)
    share = torch.rand(batch, generator=generator, device=device).view(-1, 1, 1)
    change = mask * (old - clean)
    noisy = (1 - sigma) * (clean + sigma * share * change) + sigma * noise
    velocity = noise - clean + (1 - sigma) * share * change
    return index[pick], noisy, sigma.view(-1), velocity


def train_transformer(model_dir: Path, vae: AutoencoderKL, config: TrainingConfig, device: str,
                      deadline: float) -> tuple[list[torch.nn.Module], dict]:
    """Train DiT, CLIP and T5 on (noise - image latents); returns the modules holding EMA weights."""
    info = load_model_info(model_dir)
    captions = [scene.caption for scene in all_scenes()]
    ids = PromptTokenizer(model_dir, info)(captions, captions, config.max_sequence_length)
    clip_ids, t5_ids = ids["clip_input_ids"].to(device), ids["t5_input_ids"].to(device)
    clip = ClipEncoder(model_dir, torch.float32, device).to(device)
    t5 = T5Encoder(model_dir, torch.float32, device).to(device)
    dit = DitTransformer(model_dir, torch.float32, device).to(device)
    modules = [clip, t5, dit]
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.dit_lr, weight_decay=0.0, betas=(0.9, 0.99))
    generator = torch.Generator(device).manual_seed(config.seed + 1)
    latent_side = config.size // info.vae_scale_factor
    img_ids = latent_image_ids(latent_side, latent_side, device, torch.float32)
    txt_ids = text_ids(config.max_sequence_length, device, torch.float32)
    dataset = encode_dataset(vae, config, device)
    inpaint_rows = round(config.dit_batch * config.inpaint_share)
    pairs = (encode_inpaint_pairs(vae, config, device, info.vae_scale_factor) if inpaint_rows
             else None)
    for module in modules:
        module.train()
    _compile(config.compile and device.startswith("cuda"), *modules)
    step, began, losses = 0, time.perf_counter(), []
    while step < config.dit_steps and time.perf_counter() < deadline:
        for group in optimizer.param_groups:
            progress = max(step / config.dit_steps, (time.perf_counter() - began) / (deadline - began))
            group["lr"] = config.dit_lr * _lr_factor(step, config.warmup_steps, progress)
        index, noisy, sigma, target = flow_batch(dataset, config.dit_batch - inpaint_rows, info,
                                                 generator, config.sigma_shift)
        if pairs is not None:
            extra = inpaint_batch(pairs, inpaint_rows, info, generator, config.sigma_shift)
            index, noisy, sigma, target = (torch.cat(p) for p in zip((index, noisy, sigma, target),
                                                                      extra))
        with _autocast(device):
            pooled = clip(clip_ids[index])["pooled_prompt_embeds"]
            prompt_embeds = t5(t5_ids[index])["prompt_embeds"]
            velocity = dit(noisy, prompt_embeds, pooled, sigma, img_ids, txt_ids)["noise_pred"]
        loss = (velocity.float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - config.ema_decay)
        losses.append(loss.item() if step % 50 == 0 else None)
        step += 1
        if step % 1000 == 0:
            recent = [v for v in losses[-1000:] if v is not None]
            print(f"dit step {step}: loss {sum(recent) / len(recent):.4f} "
                  f"({(time.perf_counter() - began) / step * 1000:.1f} ms/step)", flush=True)
    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
    _uncompile(*modules)
    for module in modules:
        module.eval()
    recent = [v for v in losses[-2000:] if v is not None]
    stats = {"steps": step, "seconds": round(time.perf_counter() - began, 1),
             "final_loss": round(sum(recent) / max(1, len(recent)), 5)}
    print(f"transformer: {stats}", flush=True)
    return modules, stats


def serving_defaults(config: TrainingConfig) -> dict:
    """What a request leaves out is filled from here: the trained size, steps and text length."""
    return {
        "default_height": config.size,
        "default_width": config.size,
        "default_num_inference_steps": config.num_inference_steps,
        "default_max_sequence_length": config.max_sequence_length,
        "default_guidance_scale": 0.0,
    }


def train_default_model(out_dir: str | Path, config: TrainingConfig, device: str,
                        init: Path | None = None) -> Path:
    """Build (or copy from `init`), train and write the shapes model to `out_dir`.

    The folder is swapped in only when complete. With `init` and `vae_steps` 0 the VAE and its
    latent normalisation are kept, and training goes on from the folder's weights.
    """
    if device.startswith("cuda"):
        # cuDNN's attention kernel failed in the transformer's backward pass on torch 2.11+cu130.
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    began = time.perf_counter()
    deadline = began + config.max_minutes * 60
    with staged_model_dir(out_dir) as staging:
        history = []
        if init is not None:
            shutil.copytree(init, staging, dirs_exist_ok=True)
            if (staging / TRAINING_LOG_FILE).exists():
                history = json.loads((staging / TRAINING_LOG_FILE).read_text())["runs"]
        else:
            pipeline, t5_spm = build_shapes_pipeline(config.seed)
            pipeline.save_pretrained(staging, safe_serialization=True)
            (staging / "tokenizer_2" / "spiece.model").write_bytes(t5_spm)
        write_serving_defaults(staging, serving_defaults(config))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(staging / "scheduler")
        scheduler.register_to_config(shift=config.sampling_shift)
        scheduler.save_pretrained(staging / "scheduler")

        vae = AutoencoderKL.from_pretrained(staging / "vae", dtype=torch.float32).to(device)
        vae_stats = None
        if config.vae_steps > 0:
            vae_deadline = began + min(config.vae_minutes, config.max_minutes / 2) * 60
            vae_stats = train_vae(vae, config, device, vae_deadline)
            vae.to(torch.float16).save_pretrained(staging / "vae", safe_serialization=True)
            vae = AutoencoderKL.from_pretrained(staging / "vae", dtype=torch.float32).to(device)
        vae.requires_grad_(False).eval()
        modules, dit_stats = train_transformer(staging, vae, config, device, deadline)
        for module, folder in zip(modules, ("text_encoder", "text_encoder_2", "transformer")):
            module.model.to(torch.float16).save_pretrained(staging / folder, safe_serialization=True)
        history.append({"config": asdict(config), "init": str(init) if init else None,
                        "device": _device_name(device), "vae": vae_stats, "transformer": dit_stats,
                        "minutes": round((time.perf_counter() - began) / 60, 2)})
        log = json.dumps({"runs": history}, indent=2) + "\n"
        (staging / TRAINING_LOG_FILE).write_text(log)
    return Path(out_dir).resolve()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/shapes-flux"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this model folder (with --vae-steps 0: keep its VAE)")
    for name, field in TrainingConfig.__dataclass_fields__.items():
        flag, kind = f"--{name.replace('_', '-')}", type(field.default)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=kind, default=field.default)
    args = vars(parser.parse_args(argv))
    out, device, init = args.pop("out"), args.pop("device"), args.pop("init")
    print(train_default_model(out, TrainingConfig(**args), device, init))


if __name__ == "__main__":
    main()
