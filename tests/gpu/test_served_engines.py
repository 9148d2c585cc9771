"""GPU tests against a running server (the GPU CI job sets FLUX_SERVER_GRPC); skipped elsewhere.

The served pipeline (TensorRT plans, or PyTorch on CUDA) is compared with diffusers' FluxPipeline run
on the same GPU in bf16: reduced precision allows no bit-exactness, so the bound is on PSNR.
"""

import os

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from flux_triton.clients.stream_client import build_inputs, stream_generate
from flux_triton.model_info import load_model_info
from flux_triton.serving_config import BlsOptions, read_options

SERVER = os.environ.get("FLUX_SERVER_GRPC")
pytestmark = pytest.mark.skipif(
    not SERVER or not torch.cuda.is_available(),
    reason="needs FLUX_SERVER_GRPC (a running GPU server) and a CUDA GPU",
)


def _model_dir() -> str:
    """FLUX_MODEL_DIR, else the config's model_dir when absolute (configs store it relative to the
    repository, which a client cannot see)."""
    if os.environ.get("FLUX_MODEL_DIR"):
        return os.environ["FLUX_MODEL_DIR"]
    client = grpcclient.InferenceServerClient(SERVER)
    config = client.get_model_config("flux_bls", as_json=True)["config"]
    return read_options(BlsOptions, config).model_dir


def test_stream_and_image_match_diffusers_bf16():
    from devtools.full_size import diffusers_pipeline

    info = load_model_info(_model_dir())
    fields = dict(prompt="a red circle on a blue background", height=info.default_height,
                  width=info.default_width, num_inference_steps=info.default_num_inference_steps,
                  max_sequence_length=info.default_max_sequence_length,
                  guidance_scale=info.default_guidance_scale, seed=0)
    client = grpcclient.InferenceServerClient(SERVER)
    result = stream_generate(client, build_inputs(**fields), timeout_s=600)
    assert result.error is None, result.error
    steps = fields["num_inference_steps"]
    assert result.kinds == ["step"] * steps + ["image", "final"]

    pipe = diffusers_pipeline(info, "cuda", "bfloat16")
    with torch.inference_mode():
        reference = pipe(
            prompt=fields["prompt"], height=fields["height"], width=fields["width"],
            num_inference_steps=steps, max_sequence_length=fields["max_sequence_length"],
            guidance_scale=fields["guidance_scale"], output_type="np",
            generator=torch.Generator("cpu").manual_seed(0),
        ).images
    expected = (reference * 255).round().astype(np.uint8)
    mse = np.mean((result.image.astype(np.float64) - expected) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    print(f"served vs diffusers bf16 ({info.model_dir.name}): PSNR {psnr:.1f} dB, "
          f"max uint8 diff {int(np.abs(result.image.astype(int) - expected).max())}")
    assert psnr >= float(os.environ.get("FLUX_MIN_PSNR", "30"))
