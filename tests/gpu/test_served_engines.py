"""GPU tests against a running server (the GPU CI job sets FLUX_SERVER_GRPC); skipped elsewhere.

The served pipeline (TensorRT plans, or PyTorch on CUDA) is compared with diffusers' FluxPipeline run
on the same GPU in bf16: reduced precision allows no bit-exactness, so the bound is on PSNR.
"""

import os

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from clients.stream_client import build_inputs, stream_generate

SERVER = os.environ.get("FLUX_SERVER_GRPC")
pytestmark = pytest.mark.skipif(
    not SERVER or not torch.cuda.is_available(),
    reason="needs FLUX_SERVER_GRPC (a running GPU server) and a CUDA GPU",
)


def _model_dir() -> str:
    client = grpcclient.InferenceServerClient(SERVER)
    config = client.get_model_config("flux_bls", as_json=True)["config"]
    return config["parameters"]["model_dir"]["string_value"]


def test_stream_and_image_match_diffusers_bf16():
    from diffusers import FluxPipeline

    fields = dict(prompt="a red circle on a blue background", height=1024, width=1024,
                  num_inference_steps=4, max_sequence_length=256, guidance_scale=3.5, seed=0)
    client = grpcclient.InferenceServerClient(SERVER)
    result = stream_generate(client, build_inputs(**fields), timeout_s=600)
    assert result.error is None, result.error
    assert result.kinds == ["step"] * 4 + ["image", "final"]

    pipe = FluxPipeline.from_pretrained(_model_dir(), dtype=torch.bfloat16).to("cuda")
    reference = pipe(
        prompt=fields["prompt"], height=1024, width=1024, num_inference_steps=4,
        max_sequence_length=256, guidance_scale=3.5, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images
    expected = (reference * 255).round().astype(np.uint8)
    mse = np.mean((result.image.astype(np.float64) - expected) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    print(f"served vs diffusers bf16: PSNR {psnr:.1f} dB")
    assert psnr >= 30
