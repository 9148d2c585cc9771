"""Served model configs agree with the tensor specs they were rendered from."""

import pytest

from flux_triton.export.repository import SOURCE_REPOSITORY, render_repository
from flux_triton.model_info import load_model_info
from flux_triton.serving_config import BlsOptions, read_options
from flux_triton.specs import COMPONENTS, bls_spec, component_specs, python_model_spec

TRITON_TYPES = {"BYTES": "TYPE_STRING"}


def _as_served(spec):
    return [(t.name, TRITON_TYPES.get(t.dtype, f"TYPE_{t.dtype}"),
             [d if isinstance(d, int) else -1 for d in t.dims]) for t in spec]


def _from_config(tensors):
    return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in tensors]


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_loaded_configs_match_specs(served, variant):
    srv = served[variant]
    client = srv.client()
    # the Python models as the torch runtime serves them (with `probe`); the ensemble as declared
    specs = {name: spec if name == "encode_prompt" else
             python_model_spec(spec, name, srv.info, step_cache=True)
             for name, spec in component_specs(srv.info).items()}
    specs["flux_bls"] = bls_spec(srv.info)
    for name, spec in specs.items():
        config = client.get_model_config(name, as_json=True)["config"]
        assert _from_config(config["input"]) == _as_served(spec.inputs), name
        assert _from_config(config["output"]) == _as_served(spec.outputs), name
        optional = {t["name"] for t in config["input"] if t.get("optional")}
        assert optional == {t.name for t in spec.inputs if t.optional}, name
    bls = client.get_model_config("flux_bls", as_json=True)["config"]
    assert bls["model_transaction_policy"]["decoupled"] is True
    assert read_options(BlsOptions, bls).preview_projection is not None
    dit_config = client.get_model_config("dit_transformer", as_json=True)["config"]
    dit_inputs = {t["name"] for t in dit_config["input"]}
    assert ("guidance" in dit_inputs) == (variant == "dev")
    client.close()


@pytest.mark.fast
def test_every_model_has_its_code(model_dirs):
    configs = render_repository(model_dirs["schnell"]).texts
    assert set(configs) == {*COMPONENTS, "encode_prompt", "flux_bls"}
    for name in configs:
        if name != "encode_prompt":
            assert (SOURCE_REPOSITORY / name / "1" / "model.py").exists(), name


@pytest.mark.fast
def test_gpu_configs_keep_tensors_on_device(model_dirs):
    configs = render_repository(model_dirs["dev"], device="gpu", precision="BF16").texts
    for name in ("clip_encoder", "t5_encoder", "dit_transformer", "vae_decoder", "vae_encoder", "flux_bls"):
        assert "kind: KIND_GPU" in configs[name], name
        assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS"' in configs[name], name
    assert "TYPE_BF16" in configs["dit_transformer"] and "kind: KIND_CPU" in configs["tokenizer"]


@pytest.mark.fast
def test_tensorrt_configs_and_profiles(model_dirs):
    from flux_triton.export.profiles import load_engine_config

    configs = render_repository(model_dirs["dev"], backend="tensorrt", device="gpu").texts
    for name in ("clip_encoder", "t5_encoder", "dit_transformer", "vae_decoder", "vae_encoder"):
        assert 'platform: "tensorrt_plan"' in configs[name] and "kind: KIND_GPU" in configs[name]
    assert 'backend: "python"' in configs["flux_bls"] and 'platform: "ensemble"' in configs["encode_prompt"]
    info = load_model_info(model_dirs["dev"])
    profile = load_engine_config(info).profile(component_specs(info)["dit_transformer"])
    assert profile["hidden_states"] == ((1, 256, 64), (1, 4096, 64), (4, 7056, 64))
    assert profile["img_ids"] == ((256, 3), (4096, 3), (7056, 3))
    assert profile["encoder_hidden_states"][2] == (4, 512, 32) and profile["guidance"][0] == (1,)
    vae = load_engine_config(info).profile(component_specs(info)["vae_decoder"])
    assert vae["latents"] == ((1, 16, 32, 32), (1, 16, 128, 128), (4, 16, 168, 168))


@pytest.mark.fast
def test_a_kontext_model_warms_up_its_reference_shape_too(model_dirs, kontext_dir):
    """GPU exports prepare the default shape; a Kontext model's also the same editing a
    reference image (twice the DiT's image tokens), so its first edit is not eager."""
    from flux_triton.export.repository import gpu_acceleration

    plain, kontext = load_model_info(model_dirs["dev"]), load_model_info(kontext_dir)
    assert [str(s) for s in gpu_acceleration(plain, True, None, None, None)[2]] == ["1x128x128x64"]
    warmup = gpu_acceleration(kontext, True, None, None, None)[2]
    assert [str(s) for s in warmup] == ["1x128x128x64", "1x128x128x64+reference"]
    sizes = [shape.axis_sizes(kontext)["S_img"] for shape in warmup]
    assert sizes[1] == 2 * sizes[0] == 2 * 64
    assert gpu_acceleration(kontext, False, None, None, None)[2] == ()
