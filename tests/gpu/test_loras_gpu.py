"""LoRA adapters on the GPU under compile, CUDA graphs and FP8 (merged into the weights): close to
diffusers' peft layers, switching neither recompiles nor recaptures, and without adapters the
network is its base again, bit for bit (skipped without a CUDA GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from devtools.tiny_models import write_random_lora
from flux_triton.loras import read_catalog
from flux_triton.model_info import load_model_info
from flux_triton.runtime.acceleration import Acceleration, compile_cache_counters, load_network, sample_inputs
from flux_triton.specs import ServingShape
from tests.reference import SHAPES_DIR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPE = ServingShape(2, 128, 128, 16)
DIT_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2")
SETS = [(("bold", 1.0),), (("thin", 0.7),), (("bold", 0.5), ("thin", 1.5)), ()]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Two random adapters of the shapes model: `bold` (every DiT Linear, rank 16) and `thin`
    (rank 4, DiT and CLIP)."""
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("loras")
    pipe = FluxPipeline.from_pretrained(SHAPES_DIR)
    torch.manual_seed(0)
    write_random_lora(pipe, folder / "bold", 16, 4, DIT_LAYERS, ())
    write_random_lora(pipe, folder / "thin", 4, 4, ("to_q", "to_v", "proj_mlp"), ("q_proj", "v_proj"))
    return read_catalog(folder)


def _graph_state(runner) -> tuple:
    from torch._dynamo.utils import counters

    return (runner.captures, len(runner.graphs), dict(counters["stats"]), compile_cache_counters())


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("precision,tolerance", [("BF16", 0.02), ("FP8", 0.08)])
def test_merged_adapters_switch_without_recompiling(catalog, precision, tolerance):
    info = load_model_info(SHAPES_DIR)
    phases: dict = {}
    options = Acceleration(precision, compile=True, cuda_graphs=True)
    fast = load_network("dit_transformer", info, "cuda", options, (SHAPE,), phases, catalog)
    reference = load_network("dit_transformer", info, "cuda", Acceleration("BF16"), loras=catalog)
    print(f"\n{precision}: {phases}")
    def stored(name):  # what the layer holds: float8 data, or bf16 weights
        weight = fast.adapters.weight(name)
        return (weight.qdata if hasattr(weight, "qdata") else weight).detach().clone()

    weights = {name: stored(name) for name in fast.adapters.low_rank}
    inputs = sample_inputs("dit_transformer", info, SHAPE, "cuda", precision)
    with torch.inference_mode():
        base = fast.run(**inputs)["noise_pred"].clone()
        state = _graph_state(fast.run)
        for adapters in itertools.islice(itertools.cycle(SETS), 20):
            fast.adapters.apply(adapters)
            reference.adapters.apply(adapters)
            ours, theirs = fast.run(**inputs)["noise_pred"], reference.run(**inputs)["noise_pred"]
            error = _relative_error(ours, theirs)
            assert error < tolerance, (adapters, error)
            if adapters:
                assert _relative_error(ours, base) > 2 * error, adapters  # the adapters do act
            else:
                assert torch.equal(ours, base)
        assert _graph_state(fast.run) == state  # no compile, no capture
    for name, before in weights.items():
        assert torch.equal(stored(name), before), name


def test_row_quantization_is_torchaos():
    """The fused requantization of merged float8 weights is torchao's row-wise float8 (its scale
    not rounded to bf16 first): as close to the weights."""
    from torchao.quantization import Float8Tensor, PerRow

    from flux_triton.runtime.loras import fused_quantize_rows

    weight = (torch.randn(3072, 1024, device="cuda") * 0.02).to(torch.bfloat16)
    weight[7] = 0.5  # a row of one value
    reference = Float8Tensor.from_hp(weight, granularity=PerRow())
    with torch.inference_mode():
        data, scale = fused_quantize_rows()(weight)
    torch.testing.assert_close(scale, reference.scale, rtol=2**-8, atol=0)
    ours = _relative_error(data.float() * scale, weight.float())
    theirs = _relative_error(reference.dequantize(torch.float32), weight.float())
    print(f"\nrow-wise float8 relative error: ours {ours:.5f}, torchao {theirs:.5f}")
    assert ours < 1.05 * theirs
