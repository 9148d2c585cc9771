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


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift `mu` for an image size and step count (its pipelines' `compute_empirical_mu`):
    fitted lines in the sequence length, interpolated in the steps below 4300 tokens."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def static_shift(sigmas, shift: float):
    """The scheduler's fixed time shift of sigmas (numpy or torch): `shift` > 1 moves them
    towards noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_schedule(
    sigmas: np.ndarray | list[float], image_seq_len: int, cfg: SchedulerConfig,
    mu: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [N] and sigmas [N+1] (terminal 0 appended), as FlowMatchEulerDiscreteScheduler
    `set_timesteps(sigmas=..., mu=...)` computes them; `mu` defaults to FLUX.1's
    `calculate_shift(image_seq_len)`."""
    sig = np.array(sigmas).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, cfg) if mu is None else mu
        if cfg.time_shift_type == "exponential":
            sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
        else:
            sig = mu / (mu + (1 / sig - 1) ** 1.0)
    else:
        sig = static_shift(sig, cfg.shift)
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


# FLUX.2 packs its latents differently: the noise is drawn already patched, [B, C*4, h/2, w/2]
# (h, w: the VAE's latent grid), and becomes tokens by flattening, with 4-axis position ids
# (t, row, column, l) as int64; its VAE decoder takes the patched latents (`vae_decoder` undoes the
# VAE's batch-norm normalisation and the patching).


def flux2_pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C] (Flux2Pipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def flux2_unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `flux2_pack_latents` for tokens in row order: [B, h*w, C] -> [B, C, h, w],
    contiguous (what `_unpack_latents_with_ids` scatters them to)."""
    b, _, c = packed.shape
    return packed.reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous()


def flux2_image_ids(height: int, width: int, device: torch.device | str, time: int = 0) -> torch.Tensor:
    """Position ids [h*w, 4] of an image's tokens: (time, row, column, 0), int64."""
    return torch.cartesian_prod(torch.tensor([time]), torch.arange(height), torch.arange(width),
                                torch.arange(1)).to(device)


def flux2_text_ids(seq_len: int, device: torch.device | str) -> torch.Tensor:
    """Position ids [S, 4] of the text tokens: (0, 0, 0, index), int64."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                torch.arange(seq_len)).to(device)


class LatentLayout:
    """How a family's latents become the DiT's tokens, and back; its position ids and shift.
    `h` and `w` are always the VAE's latent grid (`latent_grid`)."""

    def noise_shape(self, batch: int, channels: int, h: int, w: int) -> tuple[int, ...]:
        return batch, channels, h, w

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def unpack(self, packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens back to the latents a preview shows and the VAE decoder takes."""
        return unpack_latents(packed, h, w)

    def image_ids(self, h: int, w: int, device, dtype: torch.dtype) -> torch.Tensor:
        return latent_image_ids(h, w, device, dtype)

    def text_ids(self, seq_len: int, device, dtype: torch.dtype) -> torch.Tensor:
        return text_ids(seq_len, device, dtype)

    def shift_mu(self, image_seq_len: int, num_steps: int, cfg: SchedulerConfig) -> float | None:
        return None  # flow_match_schedule's default: calculate_shift


class Flux2LatentLayout(LatentLayout):
    def noise_shape(self, batch, channels, h, w):
        return batch, channels * 4, h // 2, w // 2

    def pack(self, latents):
        return flux2_pack_latents(latents)

    def unpack(self, packed, h, w):
        return flux2_unpack_latents(packed, h // 2, w // 2)

    def image_ids(self, h, w, device, dtype):
        return flux2_image_ids(h // 2, w // 2, device)

    def text_ids(self, seq_len, device, dtype):
        return flux2_text_ids(seq_len, device)

    def shift_mu(self, image_seq_len, num_steps, cfg):
        return empirical_mu(image_seq_len, num_steps)


LAYOUTS = {"flux1": LatentLayout(), "flux2": Flux2LatentLayout()}


def _batch_norm_stats(latents: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The FLUX.2 VAE's per-channel mean and std, in the latents' device and type (the std taken
    in the statistics' own type first, as the pipelines take it)."""
    mean = running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(running_var.view(1, -1, 1, 1) + eps).to(latents.device, latents.dtype)
    return mean, std


def flux2_denormalise(latents: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """Undo the FLUX.2 VAE's batch-norm normalisation of patched latents [B, C*4, h, w]."""
    mean, std = _batch_norm_stats(latents, running_mean, running_var, eps)
    return latents * std + mean


def flux2_normalise(latents: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """The FLUX.2 VAE's batch-norm normalisation of patched encoder latents."""
    mean, std = _batch_norm_stats(latents, running_mean, running_var, eps)
    return (latents - mean) / std


def patchify_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*4, H/2, W/2] (Flux2Pipeline._patchify_latents)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def unpatchify_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C*4, h, w] -> [B, C, 2h, 2w] (Flux2Pipeline._unpatchify_latents)."""
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(b, c // 4, h * 2, w * 2)
