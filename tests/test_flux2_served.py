"""FLUX.2 served by tritonserver: the same `flux_bls` interface, the image and every streamed
preview bit-equal to diffusers' Flux2KleinPipeline and Flux2Pipeline."""

import numpy as np
import pytest

from tests.reference import assert_served_matches_diffusers, served_generate

CASES = {
    "2 prompts x 2 images, 64x96": dict(prompt=["a red circle on blue", "two green squares"],
                                        num_images_per_prompt=2, height=64, width=96, seed=7),
    "default size, custom sigmas": dict(prompt="a horse", sigmas=[1.0, 0.6, 0.2], seed=3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_served_identical_to_diffusers(served_flux2, flux2_pipes, variant, case):
    assert_served_matches_diffusers(served_flux2[variant], flux2_pipes[variant], CASES[case],
                                    f"flux2-{variant} {case}")


def test_flux2_served_refuses_a_flux1_field_naming_it(served_flux2):
    result = served_generate(served_flux2["klein"], dict(prompt="a cat", prompt_2="a dog"))
    assert result.error is not None and "prompt_2" in result.error and "FLUX.2" in result.error
    assert result.image is None


def test_flux2_served_x0_previews(served_flux2):
    result = served_generate(served_flux2["dev"], dict(prompt="a cat", preview_kind="x0",
                                                       height=32, width=32, seed=1))
    assert result.error is None
    info = served_flux2["dev"].info
    shapes = {np.asarray(step["preview_x0"]).shape for step in result.steps}
    assert shapes == {(1, info.latent_channels * 4, 2, 2)}
