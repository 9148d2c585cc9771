"""Pure sampling math of FluxPipeline: schedule, noise, packing, Euler step, VAE scaling, postprocess.

Each function reproduces the diffusers 0.42 operation order and dtypes, so results are bit-identical.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flux_triton.model_info import SchedulerConfig


def calculate_shift(image_seq_len: int, cfg: SchedulerConfig) -> float:
    """The resolution-dependent shift `mu` (diffusers `calculate_shift`)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def default_sigmas(num_inference_steps: int) -> np.ndarray:
    """FluxPipeline's default sigmas: linspace(1, 1/N, N)."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def flow_match_schedule(
    sigmas: np.ndarray | list[float], image_seq_len: int, cfg: SchedulerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [N] and sigmas [N+1] (terminal 0 appended), as FlowMatchEulerDiscreteScheduler
    `set_timesteps(sigmas=..., mu=calculate_shift(...))` computes them."""
    sig = np.array(sigmas).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, cfg)
        if cfg.time_shift_type == "exponential":
            sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
        else:
            sig = mu / (mu + (1 / sig - 1) ** 1.0)
    else:
        sig = cfg.shift * sig / (1 + (cfg.shift - 1) * sig)
    if cfg.shift_terminal:
        one_minus_z = 1 - sig
        scale_factor = one_minus_z[-1] / (1 - cfg.shift_terminal)
        sig = 1 - (one_minus_z / scale_factor)
    sig_t = torch.from_numpy(sig).to(dtype=torch.float32)
    timesteps = sig_t * cfg.num_train_timesteps
    return timesteps, torch.cat([sig_t, torch.zeros(1)])


def latent_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent height and width for an image size (even, as packing needs)."""
    return 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))


def seeded_generator(seed: int) -> torch.Generator:
    """The generator a diffusers user passes: `torch.Generator("cpu").manual_seed(seed)`. One
    request draws everything from it, in the pipeline's order."""
    return torch.Generator("cpu").manual_seed(seed)


def standard_normal(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The next draw of `generator`, on the CPU as diffusers' `randn_tensor` makes it, then moved."""
    return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device)


def initial_noise(
    seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Noise exactly as diffusers draws it from `torch.Generator("cpu").manual_seed(seed)`."""
    return standard_normal(seeded_generator(seed), shape, dtype, device)


def strength_start(num_inference_steps: int, strength: float) -> int:
    """The first step an image-to-image run takes at `strength` (the pipelines' `get_timesteps`):
    it runs the last num_inference_steps - start steps of the schedule."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init_timestep, 0))


def scale_noise(sample: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`sample` noised to level `sigma` (FlowMatchEulerDiscreteScheduler.scale_noise):
    sigma * noise + (1 - sigma) * sample, with sigma in the sample's type."""
    sigma = sigma.to(device=sample.device, dtype=sample.dtype)
    return sigma * noise + (1.0 - sigma) * sample


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2*W/2, C*4]: 2x2 patches become tokens."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, S, C*4] -> [B, C, H, W]."""
    b, _, channels = packed.shape
    latents = packed.view(b, latent_height // 2, latent_width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, latent_height, latent_width)


def latent_image_ids(
    latent_height: int, latent_width: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """RoPE position ids [H/2*W/2, 3] of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(latent_height // 2, latent_width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(latent_height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(latent_width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def reference_image_ids(
    latent_height: int, latent_width: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """RoPE position ids of a Kontext reference image's tokens: (1, row, column)."""
    ids = latent_image_ids(latent_height, latent_width, device, dtype)
    ids[..., 0] = 1
    return ids


def text_ids(seq_len: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """RoPE position ids [S, 3] of the text tokens: all zeros."""
    return torch.zeros(seq_len, 3).to(device=device, dtype=dtype)


def repeat_per_image(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """Repeat each prompt's embedding for its images, prompt-major (diffusers' repeat + view)."""
    batch = embeds.shape[0]
    if embeds.dim() == 2:
        return embeds.repeat(1, num_images_per_prompt).view(batch * num_images_per_prompt, -1)
    seq = embeds.shape[1]
    return embeds.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq, -1)


def guidance_vector(guidance_scale: float, batch: int, device: torch.device | str) -> torch.Tensor:
    """Distilled-guidance input [B] for guidance-embedding (dev) models."""
    return torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)


def dit_timestep(t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """The transformer's `timestep` input [B]: t/1000 in the latents' dtype."""
    return t.expand(batch).to(dtype) / 1000


def true_cfg(
    noise_pred: torch.Tensor, neg_noise_pred: torch.Tensor, true_cfg_scale: float
) -> torch.Tensor:
    """Classifier-free guidance with a negative prompt."""
    return neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)


def euler_step(
    noise_pred: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor, step_index: int
) -> torch.Tensor:
    """One flow-match Euler step x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v."""
    sigma = sigmas[step_index].to(latents.device)
    sigma_next = sigmas[step_index + 1].to(latents.device)
    prev = latents.to(torch.float32) + (sigma_next - sigma) * noise_pred
    return prev.to(noise_pred.dtype)


def predicted_clean(
    noise_pred: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor, step_index: int
) -> torch.Tensor:
    """The clean latents x0 the model predicts at this step (float32): FLUX's flow matching has
    x_t = (1 - sigma) x0 + sigma noise and predicts v = noise - x0, so x0 = x_t - sigma v."""
    return latents.float() - sigmas[step_index] * noise_pred.float()


def to_vae_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """Undo the VAE latent normalisation before decoding."""
    return (latents / scaling_factor) + shift_factor


def to_model_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """The VAE latent normalisation applied to encoder output (inverse of `to_vae_latents`)."""
    return (latents - shift_factor) * scaling_factor


def postprocess_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], as diffusers' PIL output."""
    image = (decoded / 2 + 0.5).clamp(0, 1)
    image = image.permute(0, 2, 3, 1).float()
    return (image * 255).round().to(torch.uint8)
