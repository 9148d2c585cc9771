"""Bad days: component failures, out-of-memory, deadlines, cancellation, metrics (real server)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from flux_triton import sampling
from flux_triton.runtime.torch_components import load_component
from tests.reference import inject, metric, served_generate

SMALL = dict(prompt="a red circle on a blue background", height=64, width=64, num_inference_steps=3)


def test_failed_calls_are_retried(faults):
    reference = served_generate(faults, dict(SMALL, seed=21), timeout_s=60)
    retries_before = metric(faults, "flux_component_retries_total", model="dit_transformer")
    inject(faults, "dit_transformer", fail_next=2)
    result = served_generate(faults, dict(SMALL, seed=21), timeout_s=60)
    assert result.error is None, result.error
    assert np.array_equal(result.image, reference.image)
    assert result.timings["recovery"]["dit_transformer"] == {"retries": 2, "batch_splits": 0}
    assert metric(faults, "flux_component_retries_total", model="dit_transformer") == retries_before + 2


@pytest.mark.parametrize("model,stage", [("dit_transformer", "step_1"), ("vae_decoder", "vae_decoder"),
                                         ("t5_encoder", "t5_encoder")])
def test_persistent_failure_ends_stream_naming_model_and_stage(faults, model, stage):
    inject(faults, model, fail_next=100)
    began = time.perf_counter()
    result = served_generate(faults, dict(SMALL, seed=1), timeout_s=60)
    assert result.kinds[-1] == "error"
    assert f"{model} failed during {stage}" in result.error and "after 3 attempts" in result.error
    assert time.perf_counter() - began < 10  # bounded: 3 attempts, 10 + 20 ms backoff
    (faults.fault_dir / f"{model}.json").unlink()
    afterwards = served_generate(faults, dict(SMALL, seed=1), timeout_s=60)
    assert afterwards.error is None  # the server is fine afterwards


def test_out_of_memory_halves_the_batch(faults):
    fields = dict(SMALL, prompt=["a red circle", "a blue square"], num_images_per_prompt=2, seed=8)
    reference = served_generate(faults, fields, timeout_s=60)
    splits_before = metric(faults, "flux_batch_splits_total", model="dit_transformer")
    inject(faults, "dit_transformer", oom_min_batch=2)
    result = served_generate(faults, fields, timeout_s=60)
    assert result.error is None, result.error
    # batch 4 -> 2 + 2 -> 1 + 1 + 1 + 1: three splits per DiT call, three steps
    assert result.timings["recovery"]["dit_transformer"]["batch_splits"] == 9
    assert metric(faults, "flux_batch_splits_total", model="dit_transformer") == splits_before + 9
    latent_diff = max(float(np.abs(a["preview_latent"] - b["preview_latent"]).max())
                      for a, b in zip(result.steps, reference.steps))
    image_diff = int(np.abs(result.image.astype(int) - reference.image.astype(int)).max())
    print(f"\nOOM split vs unsplit: latent max abs diff {latent_diff:.2e}, uint8 max diff {image_diff}")
    # Not bit-exact: PyTorch's CPU matmul rounds differently for other batch sizes (~1e-6)
    assert latent_diff <= 1e-5 and image_diff <= 1


def test_out_of_memory_at_batch_one_is_reported(faults):
    inject(faults, "vae_decoder", oom_min_batch=1)
    result = served_generate(faults, dict(SMALL, seed=2), timeout_s=60)
    assert "vae_decoder failed during vae_decoder" in result.error and "out of memory" in result.error


def test_deadline_returns_best_image_marked_partial(served, model_dirs):
    srv = served["schnell"]
    steps = 100
    result = served_generate(srv, dict(prompt="a cat", height=128, width=128,
                                  num_inference_steps=steps, seed=3, deadline_ms=40), timeout_s=60)
    assert result.error is None, result.error
    assert result.partial and result.steps_completed < steps
    assert result.kinds == ["step"] * result.steps_completed + ["image", "final"]
    assert result.image.shape == (1, 128, 128, 3)
    if result.steps_completed:  # the image is the last preview, decoded
        vae = load_component("vae_decoder", srv.info)
        latents = torch.from_numpy(np.array(result.steps[-1]["preview_latent"]))
        with torch.inference_mode():
            decoded = vae(sampling.to_vae_latents(latents, srv.info.vae_scaling_factor,
                                                  srv.info.vae_shift_factor))["image"]
        assert np.array_equal(sampling.postprocess_uint8(decoded).numpy(), result.image)
    full = served_generate(srv, dict(prompt="a cat", height=64, width=64, num_inference_steps=2,
                                deadline_ms=60000), timeout_s=60)
    assert not full.partial and full.steps_completed == 2


def test_cancelled_stream_stops_within_one_step(faults):
    srv = faults
    inject(srv, "dit_transformer", delay_ms=150)  # steps far slower than cancellation takes to arrive
    steps_before = metric(srv, "flux_steps_total")
    cancelled_before = metric(srv, "flux_requests_total", outcome="cancelled")
    result = served_generate(srv, dict(prompt="a cat", height=64, width=64, num_inference_steps=100,
                                  seed=4), timeout_s=60, stop_after_steps=2)
    assert result.kinds == ["step", "step", "cancelled"]
    deadline = time.time() + 30
    while metric(srv, "flux_requests_total", outcome="cancelled") == cancelled_before:
        assert time.time() < deadline, "the server never noticed the cancellation"
        time.sleep(0.1)
    steps_run = metric(srv, "flux_steps_total") - steps_before
    print(f"\ncancelled after 2 streamed steps; steps run: {steps_run:.0f} of 100")
    assert steps_run <= 3  # the two received and the one in flight when the cancellation came
    time.sleep(0.5)
    assert metric(srv, "flux_steps_total") - steps_before == steps_run  # nothing keeps running


def test_deterministic_failure_is_not_retried(faults):
    inject(faults, "dit_transformer", error_next=5)
    began = time.perf_counter()
    result = served_generate(faults, dict(SMALL, seed=6), timeout_s=60)
    assert "dit_transformer failed during step_1" in result.error and "attempts" not in result.error
    assert json.loads((faults.fault_dir / "dit_transformer.json").read_text())["error_next"] == 4
    assert time.perf_counter() - began < 10


def test_metrics_are_exposed(served):
    srv = served["schnell"]
    served_generate(srv, dict(SMALL, seed=5), timeout_s=60)
    text = srv.server.metrics()
    for name in ("flux_component_latency_ms_bucket", "flux_step_latency_ms_count",
                 "flux_request_latency_ms_sum", "flux_requests_total", "flux_steps_total",
                 "flux_images_total", "flux_component_retries_total", "flux_batch_splits_total",
                 "flux_active_requests"):
        assert name in text, name
    assert metric(srv, "flux_active_requests") == 0  # every request above has ended
    assert metric(srv, "flux_component_latency_ms_count", model="dit_transformer") >= 3
    assert metric(srv, "flux_requests_total", outcome="completed") >= 1
    assert 'nv_inference_request_success{model="dit_transformer"' in text  # Triton's own, too
