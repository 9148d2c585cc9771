"""The GPU runtime options where there is no GPU: a CPU component loads as it is (nothing compiled,
quantized or captured), and the load reports what it spent its time on."""

from flux_triton.model_info import load_model_info
from flux_triton.runtime.acceleration import Acceleration, compile_cache_counters, load_accelerated
from flux_triton.runtime.torch_components import load_component
from flux_triton.specs import ServingShape


def test_cpu_component_loads_plain_and_reports_its_load_time(model_dirs):
    info = load_model_info(model_dirs["schnell"])
    phases: dict = {}
    options = Acceleration("BF16", compile=True, cuda_graphs=True)
    component = load_accelerated("vae_decoder", info, "cpu", options,
                                 (ServingShape(1, 64, 64, 16),), phases)
    assert type(component) is type(load_component("vae_decoder", info, "cpu", "bfloat16"))
    assert list(phases) == ["load_s"] and phases["load_s"] > 0


def test_compile_cache_counters_name_hits_misses_and_bypasses():
    counters = compile_cache_counters()
    assert set(counters) == {f"{cache}_{outcome}" for cache in ("fxgraph_cache", "autograd_cache")
                             for outcome in ("hit", "miss", "bypass")}
    assert all(isinstance(v, int) and v >= 0 for v in counters.values())
