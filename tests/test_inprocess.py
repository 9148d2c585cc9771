"""The shared pipeline run in-process equals diffusers' FluxPipeline; previews are fitted to the VAE."""

import numpy as np
import pytest
import torch

from flux_triton.export.previews import fit_preview_projection
from flux_triton.model_info import load_model_info
from flux_triton.preview import preview_rgb
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from tests.reference import diffusers_image, raw_inputs

pytestmark = pytest.mark.fast  # unit tests: no server


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


def test_preview_projection_recovers_colours_through_a_linear_vae():
    """A VAE whose encoder mixes each 8x8 block's mean colour into 16 channels: the fitted preview
    of an encoded image is that image at one pixel per block."""
    mixing = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))

    def linear_encoder(images):
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return torch.einsum("brhw,rc->bchw", pooled, mixing) / 0.3611 + 0.1159

    projection = fit_preview_projection(linear_encoder, 8, 0.3611, 0.1159)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = (linear_encoder(image) - 0.1159) * 0.3611
    expected = ((torch.nn.functional.avg_pool2d(image, 8) / 2 + 0.5) * 255).round()
    got = preview_rgb(latents.numpy(), projection).astype(int)
    assert np.abs(got - expected.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
