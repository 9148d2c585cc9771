"""The pipeline served by a real tritonserver, against diffusers' FluxPipeline on the same folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_triton.clients.stream_client import build_inputs
from tests.reference import PARITY_CASES, assert_served_matches_diffusers, parity_fields, served_generate


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_served_image_identical_to_diffusers(served, diffusers_pipes, variant, case):
    assert_served_matches_diffusers(served[variant], diffusers_pipes[variant],
                                    parity_fields(case, variant), f"{variant} / {case}")


@pytest.mark.fast  # the served smoke test of `make test-fast`
def test_stream_order(served):
    result = served_generate(served["schnell"], dict(prompt="a cat", num_inference_steps=6, seed=1,
                                                     height=64, width=64))
    assert result.error is None
    assert result.kinds == ["step"] * 6 + ["image", "final"]
    assert [s["step"] for s in result.steps] == [1, 2, 3, 4, 5, 6]
    assert all(s["total_steps"] == 6 for s in result.steps)
    timesteps = [s["timestep"] for s in result.steps]
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[0] == 1000.0
    assert result.steps[0]["preview_latent"].shape == (1, 16, 8, 8)
    assert result.image.shape == (1, 64, 64, 3) and result.image.dtype == np.uint8


def test_seed_is_reported_and_reproducible(served):
    first = served_generate(served["schnell"], dict(prompt="a cat", height=64, width=64))
    again = served_generate(served["schnell"], dict(prompt="a cat", height=64, width=64, seed=first.seed))
    assert first.error is None and again.error is None
    assert np.array_equal(first.image, again.image)


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_ensemble_runs_clip_and_t5_in_parallel(served):
    """Triton's own trace: CLIP and T5 compute windows of one ensemble request overlap."""
    srv = served["schnell"]
    client = srv.client()
    prompts = [f"a photo of {n} cats on a red sofa" for n in range(16)]  # enough work to measure
    for _ in range(3):
        client.infer("encode_prompt", build_inputs(prompt=prompts, prompt_2=prompts,
                                                   max_sequence_length=512))
    client.close()
    traces = srv.traces()
    models, stamps = {}, {}
    for event in traces:
        if "model_name" in event:
            models[event["id"]] = (event["model_name"], event.get("parent_id"))
        for stamp in event.get("timestamps", []):
            stamps.setdefault(event["id"], {})[stamp["name"]] = stamp["ns"]
    ensembles = [i for i, (name, _) in models.items() if name == "encode_prompt"]
    assert ensembles, "no encode_prompt trace"
    overlapped = 0
    for parent in ensembles:
        children = {models[i][0]: stamps[i] for i in models if models[i][1] == parent}
        assert {"tokenizer", "clip_encoder", "t5_encoder"} <= set(children)
        clip, t5 = children["clip_encoder"], children["t5_encoder"]
        windows = [[clip["COMPUTE_START"], clip["COMPUTE_END"]], [t5["COMPUTE_START"], t5["COMPUTE_END"]]]
        print("ensemble compute windows (ms):",
              [[round((t - clip["COMPUTE_START"]) / 1e6, 3) for t in w] for w in windows])
        overlapped += _overlap(*windows)
    # Serial execution can never overlap; on two cores the OS may still delay one stub now and then.
    assert overlapped >= 1


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_ensemble_matches_diffusers_encode_prompt(served, diffusers_pipes, variant):
    prompts, prompts_2 = ["a red circle on a blue background", "a cat"], ["a red circle", "a dog"]
    client = served[variant].client()
    result = client.infer("encode_prompt", build_inputs(prompt=prompts, prompt_2=prompts_2,
                                                        max_sequence_length=48))
    client.close()
    with torch.inference_mode():
        embeds, pooled, _ = diffusers_pipes[variant].encode_prompt(
            prompt=prompts, prompt_2=prompts_2, max_sequence_length=48)
    assert np.array_equal(result.as_numpy("prompt_embeds"), embeds.numpy())
    assert np.array_equal(result.as_numpy("pooled_prompt_embeds"), pooled.numpy())


def test_previews_can_be_left_out(served):
    with_previews = served_generate(served["schnell"], dict(prompt="a cat", height=64, width=64,
                                                            num_inference_steps=2, seed=3))
    without = served_generate(served["schnell"], dict(prompt="a cat", height=64, width=64,
                                                      num_inference_steps=2, seed=3, preview_kind="none"))
    assert without.kinds == ["step", "step", "image", "final"]
    assert all(s["preview_latent"] is None for s in without.steps)
    assert np.array_equal(without.image, with_previews.image)
