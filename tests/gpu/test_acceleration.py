"""The GPU runtime options on the trained shapes model: CUDA graphs replay exactly what the module
computes, compiled networks stay close to eager ones, float8 stays close to bf16 (skipped without
a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch

from flux_triton.model_info import load_model_info
from flux_triton.runtime.acceleration import (
    Acceleration,
    CudaGraphRunner,
    load_accelerated,
    sample_inputs,
)
from flux_triton.runtime.torch_components import load_component
from flux_triton.specs import CACHE_STATE, ServingShape
from tests.reference import SHAPES_DIR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPE = ServingShape(2, 128, 128, 16)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def info():
    return load_model_info(SHAPES_DIR)


def test_cuda_graph_replays_the_module_exactly(info):
    dit = load_component("dit_transformer", info, "cuda", "bfloat16")
    runner = CudaGraphRunner(dit)
    with torch.inference_mode():
        for seed in range(3):  # fresh inputs each time: the static buffers must be refilled
            torch.manual_seed(seed)
            inputs = sample_inputs("dit_transformer", info, SHAPE, "cuda", "BF16")
            inputs["hidden_states"] = torch.randn_like(inputs["hidden_states"])
            expected = dit(**inputs)["noise_pred"]
            assert torch.equal(runner(**inputs)["noise_pred"], expected)
    assert len(runner.graphs) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_cuda_graph_on_a_gpu_other_than_the_current_one(info):
    """A network on GPU 1 in a process whose current device is GPU 0 and which captured on GPU 0
    before (as the export's precompile does) captures its graph on GPU 1 and replays it exactly."""
    assert torch.cuda.current_device() == 0
    on_gpu0 = load_component("dit_transformer", info, "cuda:0", "bfloat16")
    with torch.inference_mode():
        CudaGraphRunner(on_gpu0)(**sample_inputs("dit_transformer", info, SHAPE, "cuda:0", "BF16"))
    dit = load_component("dit_transformer", info, "cuda:1", "bfloat16")
    runner = CudaGraphRunner(dit)
    with torch.inference_mode():
        inputs = sample_inputs("dit_transformer", info, SHAPE, "cuda:1", "BF16")
        expected = dit(**inputs)["noise_pred"]
        out = runner(**inputs)["noise_pred"]
    assert runner.graphs[runner.key(inputs)] is not None, "the capture failed"
    assert out.device == torch.device("cuda:1") and torch.equal(out, expected)


@pytest.mark.parametrize("name", ["dit_transformer", "vae_decoder", "vae_encoder", "t5_encoder"])
def test_compiled_networks_are_as_close_to_float32_as_eager_bf16(info, name):
    """Compiled kernels (and channels_last for the VAE) round differently from eager ones; judged
    against float32, they must be no worse than eager bf16 is."""
    reference = load_component(name, info, "cuda", "float32")
    eager = load_component(name, info, "cuda", "bfloat16")
    fast = load_accelerated(name, info, "cuda", Acceleration("BF16", compile=True, cuda_graphs=True),
                            warmup=(SHAPE,))
    inputs = sample_inputs(name, info, SHAPE, "cuda", "BF16")
    with torch.inference_mode():
        ref = reference(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
        out_eager, out_fast = eager(**inputs), fast(**inputs)
    for key in ref:
        eager_error = _relative_error(out_eager[key], ref[key])
        fast_error = _relative_error(out_fast[key], ref[key])
        print(f"{name} vs float32: eager bf16 {eager_error:.2e}, compiled bf16 {fast_error:.2e}")
        assert fast_error <= 1.5 * eager_error + 1e-3


def test_float8_dit_stays_close_to_bf16(info):
    import torch._inductor.config as inductor_config

    tuning_before = (inductor_config.coordinate_descent_tuning,
                     inductor_config.coordinate_descent_check_all_directions)
    bf16 = load_component("dit_transformer", info, "cuda", "bfloat16")
    fp8 = load_accelerated("dit_transformer", info, "cuda", Acceleration("FP8"))
    # quantizing must not switch on process-wide kernel tuning (minutes at every start)
    assert (inductor_config.coordinate_descent_tuning,
            inductor_config.coordinate_descent_check_all_directions) == tuning_before
    inputs = sample_inputs("dit_transformer", info, SHAPE, "cuda", "FP8")
    with torch.inference_mode():
        error = _relative_error(fp8(**inputs)["noise_pred"], bf16(**inputs)["noise_pred"])
    print(f"float8 DiT vs bf16 on the trained model: relative error {error:.2e}")
    assert 0 < error < 0.1


def test_first_block_cache_runs_compiled_beside_the_graph(info):
    """The fast tier on an accelerated DiT: a cached call (not captured: it decides on the host)
    computes what the eager module computes within bf16's compiled rounding, a skipped call adds
    the cached residual to the first block's output, and neither recaptures the plain graph."""
    eager = load_component("dit_transformer", info, "cuda", "bfloat16")
    fast = load_accelerated("dit_transformer", info, "cuda",
                            Acceleration("BF16", compile=True, cuda_graphs=True), warmup=(SHAPE,))
    inputs = sample_inputs("dit_transformer", info, SHAPE, "cuda", "BF16")
    state_names = CACHE_STATE

    def threshold(value):
        return {"cache_threshold": torch.tensor([value], device="cuda")}

    with torch.inference_mode():
        plain = fast(**inputs)["noise_pred"]
        captures = fast.captures
        first_eager, first_fast = eager(**inputs, **threshold(0.1)), fast(**inputs, **threshold(0.1))
        assert bool(first_fast["cache_computed"].all())
        assert _relative_error(first_fast["noise_pred"], first_eager["noise_pred"]) < 0.02
        assert _relative_error(first_fast["noise_pred"], plain) < 0.02
        state = {name: first_fast[name] for name in state_names}
        skipped = fast(**inputs, **threshold(1e9), **state)  # no change exceeds it
        assert not bool(skipped["cache_computed"].any())
        # same inputs: the first block's output plus the cached rest is the full call's output
        assert _relative_error(skipped["noise_pred"], first_fast["noise_pred"]) < 1e-2
        assert all(skipped[name] is state[name] for name in state_names)
        assert fast.captures == captures and torch.equal(fast(**inputs)["noise_pred"], plain)
