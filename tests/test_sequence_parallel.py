"""One DiT over several ranks (SEQUENCE_PARALLEL, diffusers' Ulysses context parallelism), on the
CPU over gloo: the same image within one uint8 level, uneven shapes on rank 0 alone, a killed rank
healed, and the export's groups of GPUs."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from flux_triton.export.onnx_export import sample_inputs
from flux_triton.export.repository import render_repository
from flux_triton.model_info import load_model_info
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.runtime.sequence_parallel import SequenceParallelDit
from tests.reference import raw_inputs, served_generate

WORKER = "flux_triton[.]runtime[.]sequence_parallel"


def worker_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"{WORKER} --model-dir"], capture_output=True,
                           text=True).stdout
    return [int(pid) for pid in found.split()]


@pytest.mark.fast
def test_two_ranks_compute_the_dit_of_one(model_dirs):
    info = load_model_info(model_dirs["dev"])
    dit = SequenceParallelDit(info, ("cpu", "cpu"))
    try:
        even = sample_inputs("dit_transformer", info, {"B": 2, "S_txt": 16, "H_lat": 8, "W_lat": 12})
        with torch.inference_mode():
            parallel = dit(**even)["noise_pred"]
            alone = dit.local(**even)["noise_pred"]
        assert dit.parallel_calls == 1 and torch.allclose(parallel, alone, atol=1e-5)
        uneven = sample_inputs("dit_transformer", info, {"B": 1, "S_txt": 15, "H_lat": 8, "W_lat": 8})
        with torch.inference_mode():
            dit(**uneven)  # 15 text tokens do not split over 2 ranks: rank 0 alone
        assert dit.local_calls == 1
        os.kill(dit.workers[0].pid, signal.SIGKILL)
        dit.workers[0].wait()
        with torch.inference_mode():
            healed = dit(**even)["noise_pred"]
        assert dit.restarts == 1 and torch.allclose(healed, alone, atol=1e-5)
    finally:
        dit.close()
    assert all(w.poll() == 0 for w in dit.workers)


@pytest.mark.fast
def test_in_process_image_over_two_ranks_within_one_level(model_dirs):
    info = load_model_info(model_dirs["dev"])
    request = validate_request(raw_inputs(prompt=["a red circle", "a cat"], height=64, width=96,
                                          seed=3, max_sequence_length=32), info)
    single = list(run_in_process(request, info, TorchFluxModels(info)))[-1].image.numpy()
    models = TorchFluxModels(info, sequence_parallel=("cpu", "cpu"))
    try:
        parallel = list(run_in_process(request, info, models))[-1].image.numpy()
        assert models.parts["dit_transformer"].parallel_calls == request.num_inference_steps
    finally:
        models.parts["dit_transformer"].close()
    assert np.abs(parallel.astype(int) - single.astype(int)).max() <= 1


@pytest.mark.fast
def test_export_groups_the_gpus(model_dirs, tmp_path):
    rendered = render_repository(model_dirs["schnell"], device="gpu", gpus="0,1,2,3",
                                 sequence_parallel=2, repository=tmp_path / "repo", compile=False)
    deployments = {d.name: d for d in rendered.deployment.models}
    assert deployments["flux_bls"].gpus == (0, 2)
    assert rendered.options["dit_transformer"].sequence_parallel_devices == ("cuda:0", "cuda:1")
    assert rendered.options["dit_transformer_gpu2"].sequence_parallel_devices == ("cuda:2", "cuda:3")
    assert deployments["t5_encoder_gpu2"].gpus == (2,)
    assert rendered.options["vae_decoder"].sequence_parallel_devices == ()
    with pytest.raises(ValueError, match="list a multiple of 2"):
        render_repository(model_dirs["schnell"], device="gpu", gpus="0,1,2", sequence_parallel=2,
                          repository=tmp_path / "repo")
    with pytest.raises(ValueError, match="BACKEND=torch"):
        render_repository(model_dirs["schnell"], backend="onnx", sequence_parallel=2,
                          repository=tmp_path / "repo")
    cpu = render_repository(model_dirs["schnell"], sequence_parallel=2, repository=tmp_path / "repo")
    assert cpu.options["dit_transformer"].sequence_parallel_devices == ("cpu", "cpu")
    assert cpu.options["flux_bls"].lora_dir is None  # adapters are not served with it


def test_served_over_two_ranks_heals_a_killed_rank(model_dirs, tmp_path_factory):
    """SEQUENCE_PARALLEL=2 on the CPU: the served image within one uint8 level of one rank's; a
    rank killed between requests is started again by the next call, which succeeds."""
    from tests.conftest import _serve_variants

    fields = dict(prompt="a red circle", height=64, width=64, seed=2, max_sequence_length=32)
    info = load_model_info(model_dirs["dev"])
    single = list(run_in_process(validate_request(raw_inputs(**fields), info),
                                 info, TorchFluxModels(info)))[-1].image.numpy()
    for servers in _serve_variants(model_dirs, tmp_path_factory, "torch", ("dev",),
                                   sequence_parallel=2):
        first = served_generate(servers["dev"], fields)
        assert first.error is None, first.error
        assert np.abs(first.image.astype(int) - single.astype(int)).max() <= 1
        workers = worker_pids()
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(0.5)
        second = served_generate(servers["dev"], fields)
        assert second.error is None, second.error
        assert np.array_equal(second.image, first.image)
        assert worker_pids() and worker_pids() != workers
    deadline = time.monotonic() + 5
    while worker_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker_pids(), "the server left a rank behind"


@pytest.mark.fast
def test_a_rank_that_cannot_start_is_an_error_not_a_hang(model_dirs):
    info = load_model_info(model_dirs["dev"])
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not start .*exited \[\(1, 1\)\]"):
        SequenceParallelDit(info, ("cpu", "no-such-device"))
    assert time.monotonic() - began < 60 and not worker_pids()


@pytest.mark.fast
def test_a_call_failing_on_rank_0_alone_leaves_no_group_out_of_step(model_dirs, monkeypatch):
    """Rank 0 fails after handing a call over (out of memory there, say): the other ranks sit in
    that call's collectives, so the group is not used again; the next call starts a fresh one."""
    from flux_triton.runtime import sequence_parallel as sp

    info = load_model_info(model_dirs["dev"])
    dit = SequenceParallelDit(info, ("cpu", "cpu"))
    original, failures = sp.SequenceParallelDit._parallel_call, [2]

    def fails_after_sending(self, inputs):
        if failures[0]:
            failures[0] -= 1
            sp._send(inputs, self.devices[0])  # the workers start the call; rank 0 never joins
            raise RuntimeError("out of memory on rank 0")
        return original(self, inputs)

    monkeypatch.setattr(sp.SequenceParallelDit, "_parallel_call", fails_after_sending)
    inputs = sample_inputs("dit_transformer", info, {"B": 1, "S_txt": 16, "H_lat": 8, "W_lat": 8})
    try:
        with torch.inference_mode(), pytest.raises(RuntimeError, match="out of memory"):
            dit(**inputs)
        assert dit.broken
        with torch.inference_mode():
            out = dit(**inputs)["noise_pred"]
            alone = dit.local(**inputs)["noise_pred"]
        assert not dit.broken and dit.restarts == 2 and torch.allclose(out, alone, atol=1e-5)
    finally:
        dit.close()
    assert not worker_pids()


@pytest.mark.fast
def test_groups_that_cannot_split_the_dit_are_refused_at_export(model_dirs, flux2_dirs, tmp_path):
    with pytest.raises(ValueError, match="must divide the DiT's 2 attention heads"):
        render_repository(model_dirs["dev"], sequence_parallel=3, repository=tmp_path / "repo")
    with pytest.raises(ValueError, match="served for FLUX.1 models"):
        render_repository(flux2_dirs["klein"], sequence_parallel=2, repository=tmp_path / "repo")
