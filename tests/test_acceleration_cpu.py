"""The GPU runtime options where there is no GPU: a CPU component loads as it is (nothing compiled,
quantized or captured), and the load reports what it spent its time on."""

import weakref

import torch

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


def test_compile_cache_counters_see_a_miss_then_a_hit(tmp_path, monkeypatch):
    """The counters are torch's own: a first compile in an empty cache misses, the same compile
    after a reset reads it (a renamed torch counter would read 0 and fail here)."""
    import torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def scaled_gelu(x):
        return torch.nn.functional.gelu(x) * 2 + 1

    before = compile_cache_counters()
    torch._dynamo.reset()
    torch.compile(scaled_gelu)(torch.randn(8, 8))
    first = compile_cache_counters()
    torch._dynamo.reset()
    torch.compile(scaled_gelu)(torch.randn(8, 8))
    second = compile_cache_counters()
    torch._dynamo.reset()
    assert first["fxgraph_cache_miss"] == before["fxgraph_cache_miss"] + 1
    assert first["autograd_cache_miss"] == before["autograd_cache_miss"] + 1
    assert second["fxgraph_cache_hit"] == first["fxgraph_cache_hit"] + 1
    assert second["autograd_cache_hit"] == first["autograd_cache_hit"] + 1


def test_precompile_warms_each_network_on_each_gpu_one_at_a_time(model_dirs, flux2_dirs, tmp_path,
                                                                  monkeypatch):
    """flux_triton.export.precompile loads, compiles and frees one network at a time, for every GPU listed
    (the cache keys name the device), and does nothing when there is nothing to compile."""
    import flux_triton.export.precompile as precompile_module
    from flux_triton.specs import NETWORKS, ServingShape

    loaded, live = [], weakref.WeakSet()

    class Runner:
        pass

    def fake_load(name, info, device, options, warmup, phases):
        assert not live, "the previous network was not freed before the next one loaded"
        loaded.append((name, device, options.cache_dir, warmup))
        phases["compile_cache"] = {"fxgraph_cache_miss": 1}
        runner = Runner()
        live.add(runner)
        return runner

    monkeypatch.setattr(precompile_module, "load_accelerated", fake_load)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    info = load_model_info(model_dirs["schnell"])
    shape = (ServingShape.parse("1x64x64x16"),)
    options = Acceleration("BF16", compile=True, cuda_graphs=True, cache_dir=str(tmp_path / "cache"))
    report = precompile_module.precompile(info, options, shape, (0, 2))
    assert [(n, d) for n, d, _, _ in loaded] == [(n, f"cuda:{g}") for g in (0, 2) for n in NETWORKS]
    assert {c for _, _, c, _ in loaded} == {str(tmp_path / "cache")} and (tmp_path / "cache").is_dir()
    assert set(report) == {f"{n}@cuda:{g}" for g in (0, 2) for n in NETWORKS}
    loaded.clear()
    # a FLUX.2 folder: its own networks (the text encoder, not CLIP or T5)
    precompile_module.precompile(load_model_info(flux2_dirs["klein"]), options, shape, (0,))
    assert [n for n, *_ in loaded] == ["text_encoder", "dit_transformer", "vae_decoder",
                                       "vae_encoder"]
    loaded.clear()
    assert precompile_module.precompile(info, Acceleration("BF16", compile=False), shape, (0,)) == {}
    assert precompile_module.precompile(info, options, (), (0,)) == {} and loaded == []


def test_accelerated_calls_try_cudnn_attention_first(model_dirs):
    """Every accelerated network runs (compiles, captures, runs eagerly) with SDPA's priority
    pinned to ATTENTION_PRIORITY, and the process's own order comes back after each call."""
    from torch.nn.attention import SDPBackend

    from flux_triton.runtime.acceleration import ATTENTION_PRIORITY, AttentionPinned, accelerate

    expected = [getattr(SDPBackend, name).value for name in ATTENTION_PRIORITY]
    before = torch._C._get_sdp_priority_order()
    assert before[:4] != expected  # torch's default differs, so the pin is what sets it
    pinned = AttentionPinned(lambda **_: {"order": torch._C._get_sdp_priority_order()})
    assert pinned()["order"][:4] == expected
    assert torch._C._get_sdp_priority_order() == before
    info = load_model_info(model_dirs["schnell"])
    component = load_component("vae_decoder", info, "cpu", "float32")
    runner = accelerate("vae_decoder", component, Acceleration("FP32", compile=False, cuda_graphs=False))
    assert isinstance(runner, AttentionPinned) and runner.runner is component
