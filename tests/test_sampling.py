"""The pure sampling functions against diffusers' own implementations."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift
from diffusers.utils.torch_utils import randn_tensor

from flux_triton import sampling
from flux_triton.model_info import SchedulerConfig

pytestmark = pytest.mark.fast  # unit tests: no server

SCHEDULERS = [
    dict(shift=1.0, use_dynamic_shifting=False),
    dict(shift=3.0, use_dynamic_shifting=False),
    dict(shift=3.0, use_dynamic_shifting=True),
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(shift=1.0, use_dynamic_shifting=True, shift_terminal=0.1),
]


@pytest.mark.parametrize("config", SCHEDULERS)
@pytest.mark.parametrize("steps,seq_len", [(1, 256), (4, 64), (28, 4096), (50, 1000)])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_schedule_matches_scheduler(config, steps, seq_len):
    reference = FlowMatchEulerDiscreteScheduler(**config)
    cfg = SchedulerConfig(**config)
    sigmas = sampling.default_sigmas(steps)
    mu = diffusers_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert sampling.calculate_shift(seq_len, cfg) == mu
    reference.set_timesteps(sigmas=sigmas, mu=mu)
    timesteps, sigma_schedule = sampling.flow_match_schedule(sigmas, seq_len, cfg)
    # exact, NaN included (shift_terminal with one step divides by zero in diffusers too)
    torch.testing.assert_close(timesteps, reference.timesteps, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sigma_schedule, reference.sigmas, rtol=0, atol=0, equal_nan=True)


def test_custom_sigmas_match_scheduler():
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    custom = [1.0, 0.83, 0.5, 0.21, 0.05]
    reference.set_timesteps(sigmas=custom, mu=0.9)
    cfg = SchedulerConfig(shift=3.0, use_dynamic_shifting=True)
    seq_len = round((0.9 - 0.5 + (1.15 - 0.5) / 3840 * 256) / ((1.15 - 0.5) / 3840))
    timesteps, sigma_schedule = sampling.flow_match_schedule(custom, seq_len, cfg)
    assert torch.allclose(sigma_schedule, reference.sigmas, atol=1e-6)
    assert len(timesteps) == len(custom)


def test_euler_step_matches_scheduler():
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=sampling.default_sigmas(4))
    cfg = SchedulerConfig(shift=3.0)
    _, sigma_schedule = sampling.flow_match_schedule(sampling.default_sigmas(4), 64, cfg)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 64, generator=gen)
    for i, t in enumerate(reference.timesteps):
        velocity = torch.randn(2, 16, 64, generator=gen)
        expected = reference.step(velocity, t, latents, return_dict=False)[0]
        latents_ours = sampling.euler_step(velocity, latents, sigma_schedule, i)
        assert torch.equal(latents_ours, expected)
        latents = expected


def test_noise_pack_unpack_and_ids_match_pipeline():
    shape = (3, 16, 12, 8)
    ours = sampling.initial_noise(42, shape, torch.float32)
    ref = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert torch.equal(ours, ref)
    packed = sampling.pack_latents(ours)
    assert torch.equal(packed, FluxPipeline._pack_latents(ref, 3, 16, 12, 8))
    assert torch.equal(sampling.unpack_latents(packed, 12, 8),
                       FluxPipeline._unpack_latents(packed, 96, 64, 8))
    assert torch.equal(sampling.unpack_latents(packed, 12, 8), ours)
    assert torch.equal(sampling.latent_image_ids(12, 8, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(3, 6, 4, "cpu", torch.float32))
    assert sampling.latent_grid(96, 64, 8) == (12, 8)


def test_repeat_per_image_matches_encode_prompt_order():
    pooled = torch.arange(6.0).view(2, 3)
    repeated = sampling.repeat_per_image(pooled, 2)
    assert repeated[:, 0].tolist() == [0, 0, 3, 3]
    seq = torch.arange(12.0).view(2, 2, 3)
    assert torch.equal(sampling.repeat_per_image(seq, 3)[2], seq[0])
    assert torch.equal(sampling.repeat_per_image(seq, 3)[3], seq[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_postprocess_matches_pil_output(dtype):
    decoded = (torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 1.2).to(dtype)
    processor = VaeImageProcessor(vae_scale_factor=16)
    reference = processor.postprocess(decoded, output_type="pil")
    ours = sampling.postprocess_uint8(decoded).numpy()
    assert all(np.array_equal(np.asarray(img), ours[i]) for i, img in enumerate(reference))


def test_predicted_clean_is_where_the_euler_step_lands_at_the_end():
    """x0 = x_t - sigma_t v: the last Euler step (to sigma 0) lands exactly there."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 64, generator=generator)
    velocity = torch.randn(2, 16, 64, generator=generator)
    sigmas = torch.tensor([0.7, 0.0])
    x0 = sampling.predicted_clean(velocity, latents, sigmas, 0)
    assert torch.allclose(x0, sampling.euler_step(velocity, latents, sigmas, 0), atol=1e-6)
    assert torch.allclose(x0, latents - 0.7 * velocity)


def test_client_side_numpy_conversions_equal_the_servers():
    from flux_triton.clients.previews import to_uint8_image, to_vae_latents

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    assert np.allclose(to_vae_latents(latents.numpy(), 0.3611, 0.1159),
                       sampling.to_vae_latents(latents, 0.3611, 0.1159).numpy(), rtol=0, atol=1e-6)
    decoded = torch.rand(2, 3, 16, 16, generator=generator) * 2.4 - 1.2
    assert np.array_equal(to_uint8_image(decoded.numpy()), sampling.postprocess_uint8(decoded).numpy())
