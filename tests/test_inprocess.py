"""The shared pipeline run in-process equals diffusers' FluxPipeline; previews are fitted to the VAE."""

import numpy as np
import pytest
import torch

from flux_triton.local import TorchFluxModels, run_in_process
from flux_triton.model_info import load_model_info
from flux_triton.preview import fit_preview_projection, preview_rgb
from flux_triton.request import validate_request
from tests.reference import diffusers_image, raw_inputs


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_in_process_identical_to_diffusers(model_dirs, diffusers_pipes, variant):
    info = load_model_info(model_dirs[variant])
    models = TorchFluxModels(info)
    request = validate_request(raw_inputs(
        prompt=["a red circle", "a blue square"], num_images_per_prompt=2, negative_prompt="noise",
        true_cfg_scale=3.0, height=80, width=48, seed=9, guidance_scale=2.5), info)
    events = list(run_in_process(request, info, models))
    expected, _, _ = diffusers_image(diffusers_pipes[variant], request)
    assert [e.step for e in events[:-1]] == [1, 2, 3, 4]
    assert np.array_equal(events[-1].image.numpy(), expected)


def test_preview_projection_recovers_a_linear_decoder():
    true_factors = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    true_bias = torch.tensor([0.1, -0.2, 0.05])

    def linear_decoder(vae_latents):  # undoes scaling/shift, mixes channels, upsamples 8x
        latents = (vae_latents - 0.1159) * 0.3611
        rgb = torch.einsum("bchw,cr->brhw", latents, true_factors) + true_bias[None, :, None, None]
        return rgb.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)

    projection = fit_preview_projection(linear_decoder, 16, 8, 0.3611, 0.1159)
    assert np.allclose(projection.factors, true_factors.numpy(), atol=1e-4)
    assert np.allclose(projection.bias, true_bias.numpy(), atol=1e-4)
    latents = torch.randn(1, 16, 4, 4)
    expected = ((linear_decoder(latents / 0.3611 + 0.1159)[:, :, ::8, ::8] / 2 + 0.5).clamp(0, 1) * 255)
    assert np.abs(preview_rgb(latents, projection).numpy().astype(int)
                  - expected.round().permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
