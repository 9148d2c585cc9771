"""LoRA adapters per request: the catalog of LORA_DIR (hostile files included), validation, and
images bit-exact with diffusers' FluxPipeline after `load_lora_weights` + `set_adapters`, in-process,
served by Triton, through the gateway and the gRPC client; batching never mixes adapters."""

from __future__ import annotations

import json
import shutil
import struct
import threading

import numpy as np
import pytest
import torch

from flux_triton.clients import stream_client
from flux_triton.loras import WEIGHTS_FILE, read_catalog
from flux_triton.model_info import load_model_info
from flux_triton.request import InvalidRequest, validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import ServingLimits
from tests.reference import diffusers_image, metric, raw_inputs, served_generate

SMALL = dict(prompt=["a red circle", "a cat"], height=64, width=96, num_inference_steps=3, seed=5,
             num_images_per_prompt=2)
# (adapters, scales): one adapter; two, one of them also adapting CLIP, with scales FP32 holds exactly
CASES = {"style": (["style"], [0.75]), "style+texture": (["style", "texture"], [0.5, 1.5])}


def diffusers_with(model_dir, names: list[str], scales: list[float]):
    """diffusers' FluxPipeline with these adapters loaded from the model's loras/ and set, as a
    user of diffusers does it (the scales as the server gets them: FP32)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir)
    for name in names:
        pipe.load_lora_weights(str(model_dir / "loras" / name), adapter_name=name)
    pipe.set_adapters(names, [float(np.float32(s)) for s in scales])
    return pipe


def _request(info, names=(), scales=(), **fields):
    raw = raw_inputs(**dict(SMALL, **fields))
    if names:
        raw["lora"] = np.array([n.encode() for n in names], dtype=object)
        raw["lora_scale"] = np.array(scales, dtype=np.float32)
    return validate_request(raw, info, loras={"style", "texture"})


# -- the catalog -----------------------------------------------------------------------------

@pytest.mark.fast
def test_catalog_lists_the_adapters_of_the_folder(model_dirs):
    catalog = read_catalog(model_dirs["schnell"] / "loras")
    assert catalog.names == ["style", "texture"] and not catalog.problems
    style, texture = catalog.adapters["style"], catalog.adapters["texture"]
    assert (style.rank, style.key_format, style.text_encoder) == (4, "diffusers", False)
    assert {"attn.to_q", "proj_mlp", "ff.net.2"} <= set(style.targets)
    assert texture.rank == 2 and texture.text_encoder and "self_attn.q_proj" in texture.targets
    assert catalog.describe()["loras"][0] == {
        "name": "style", "rank": 4, "key_format": "diffusers", "targets": list(style.targets),
        "text_encoder": False, "size_bytes": style.size_bytes}


def _safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.fast
def test_hostile_adapter_files_are_listed_not_loaded(model_dirs, tmp_path):
    """Files that are not LoRA safetensors are never loaded: each folder is listed with why, and
    the good adapter beside them is served."""
    shutil.copytree(model_dirs["schnell"] / "loras" / "style", tmp_path / "good")
    lora_a = {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}
    hostile = {
        "huge-header": _safetensors(b"{}", length=2**40),
        "truncated": b"\x01\x02\x03",
        "not-json": _safetensors(b"\xff\xfe not json at all"),
        "not-an-object": _safetensors([1, 2, 3]),
        "offsets-past-the-end": _safetensors({"x.lora_A.weight": {**lora_a, "data_offsets": [0, 10**9]}}),
        "no-lora-keys": _safetensors({"x.weight": lora_a}, b"\0" * 128),
        "zero-dim": _safetensors({"x.lora_A.weight": {**lora_a, "shape": [0, 8]}}, b"\0" * 128),
    }
    for name, content in hostile.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS_FILE).write_bytes(content)
    (tmp_path / "pickle-only").mkdir()
    (tmp_path / "pickle-only" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04 not safe")
    (tmp_path / "two-files").mkdir()
    for file in ("a.safetensors", "b.safetensors"):
        shutil.copy(tmp_path / "good" / WEIGHTS_FILE, tmp_path / "two-files" / file)
    (tmp_path / "a link").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / WEIGHTS_FILE).symlink_to(tmp_path / "good" / WEIGHTS_FILE)
    catalog = read_catalog(tmp_path)
    assert catalog.names == ["good"]
    expected = {*hostile, "pickle-only", "two-files", "a link", ".hidden", "linked"}
    assert set(catalog.problems) == expected
    print("\n" + "\n".join(catalog.lines()))
    assert "a header of 1099511627776 bytes" in catalog.problems["huge-header"]
    assert "holds no LoRA weights" in catalog.problems["no-lora-keys"]
    assert "found ['pytorch_lora_weights.bin']" not in catalog.problems["pickle-only"]
    assert "none" in catalog.problems["pickle-only"] and "symbolic link" in catalog.problems["linked"]
    # and what the server loads from that folder is the good adapter alone
    info = load_model_info(model_dirs["schnell"])
    models = TorchFluxModels(info, loras=catalog)
    assert models.adapters["dit_transformer"].loaded == {"good"}


@pytest.mark.fast
def test_requests_name_known_adapters_with_finite_scales(model_dirs):
    info = load_model_info(model_dirs["schnell"])

    def refused(names, scales=None, limits=None):
        raw = raw_inputs(prompt="a cat")
        raw["lora"] = np.array([n.encode() for n in names], dtype=object)
        if scales is not None:
            raw["lora_scale"] = np.array(scales, dtype=np.float32)
        with pytest.raises(InvalidRequest) as error:
            validate_request(raw, info, limits, loras={"style", "texture"})
        return error.value.field, str(error.value)

    assert refused(["style", "sketch"]) == (
        "lora", "`lora`: unknown adapter 'sketch'; this server has ['style', 'texture']")
    assert refused(["style"] * 2)[0] == "lora"
    assert refused(["a", "b", "c"], limits=ServingLimits(max_loras=2)) == (
        "lora", "`lora`: at most 2 adapters, got 3")
    assert refused(["style"], [float("nan")])[0] == "lora_scale"
    assert refused(["style"], [1e6])[0] == "lora_scale"
    assert refused(["style", "texture"], [1.0])[1].startswith("`lora_scale`: must hold one scale")
    raw = raw_inputs(prompt="a cat", lora_scale=[0.5])
    with pytest.raises(InvalidRequest, match="`lora_scale`: needs `lora`"):
        validate_request(raw, info, loras={"style"})
    with pytest.raises(InvalidRequest, match="this server has none"):
        validate_request({**raw_inputs(prompt="a cat"),
                          "lora": np.array([b"style"], dtype=object)}, info)


# -- in-process, against diffusers -----------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_in_process_adapters_equal_diffusers(model_dirs, variant):
    """One process serving every adapter: each request's image equals diffusers' with just its
    adapters loaded and set; requests without adapters equal the folder's own weights, before and
    after."""
    model_dir = model_dirs[variant]
    info = load_model_info(model_dir)
    models = TorchFluxModels(info, loras=read_catalog(model_dir / "loras"))
    fields = dict(guidance_scale=4.5) if variant == "dev" else {}

    def ours(names=(), scales=()):
        return list(run_in_process(_request(info, names, scales, **fields), info, models))[-1].image.numpy()

    base = ours()
    from diffusers import FluxPipeline

    assert np.array_equal(base, diffusers_image(FluxPipeline.from_pretrained(model_dir),
                                                _request(info, **fields))[0])
    for label, (names, scales) in CASES.items():
        expected = diffusers_image(diffusers_with(model_dir, names, scales), _request(info, **fields))[0]
        image = ours(names, scales)
        print(f"\n{variant} {label}: {np.abs(image.astype(int) - base).max()} levels from the base "
              f"image, {np.abs(image.astype(int) - expected).max()} from diffusers")
        assert np.array_equal(image, expected), label
        assert not np.array_equal(image, base)
    assert np.array_equal(ours(), base)  # the base weights, untouched by the adapters


# -- served ----------------------------------------------------------------------------------

def _served_image(srv, names=(), scales=()):
    fields = dict(SMALL, lora=list(names) or None, lora_scale=list(scales) or None)
    result = served_generate(srv, {k: v for k, v in fields.items() if v is not None})
    assert result.error is None, result.error
    return result.image


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_served_adapters_equal_diffusers(served, model_dirs, variant):
    srv = served[variant]
    fields = dict(guidance_scale=4.5) if variant == "dev" else {}
    names, scales = CASES["style+texture"]
    before = _served_image(srv) if not fields else None
    request = _request(srv.info, **fields)
    expected = diffusers_with(model_dirs[variant], names, scales)
    result = served_generate(srv, dict(SMALL, **fields, lora=names, lora_scale=scales))
    assert result.error is None, result.error
    assert np.array_equal(result.image, diffusers_image(expected, request)[0])
    if before is not None:  # the same server without adapters: the folder's own weights again
        assert np.array_equal(_served_image(srv), before)


def test_served_adapter_list_over_grpc(served, capsys):
    code = stream_client.main(["--url", served["schnell"].url, "--list-loras"])
    listing = json.loads(capsys.readouterr().out)
    assert code == 0 and [a["name"] for a in listing["loras"]] == ["style", "texture"]
    assert listing["unavailable"] == {}


def test_client_applies_adapters(served, tmp_path, capsys):
    srv = served["schnell"]
    code = stream_client.main(["--url", srv.url, "--prompt", "a red circle", "--prompt", "a cat",
                               "--height", "64", "--width", "96", "--steps", "3", "--seed", "5",
                               "--images-per-prompt", "2", "--lora", "style:0.5",
                               "--lora", "texture:1.5", "--out", str(tmp_path), "--show", "never"])
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    expected = _served_image(srv, *CASES["style+texture"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "image_3.png")), expected[3])
    assert stream_client.main(["--url", srv.url, "--prompt", "a", "--lora", "style:x"]) == 2
    assert "NAME[:SCALE]" in capsys.readouterr().err


def test_batching_never_mixes_adapters(served_batched, served):
    """Concurrent requests with different adapters on a server that merges DiT calls: never merged,
    each equals the same request served alone (bit-exact); with the same adapters they merge."""
    srv = served_batched
    alone = {label: _served_image(served["schnell"], *case) for label, case in CASES.items()}
    merged_before = metric(srv, "flux_dit_merged_calls_total")
    images = {}

    def run(label):
        images[label] = _served_image(srv, *CASES[label])

    threads = [threading.Thread(target=run, args=(label,)) for label in CASES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert metric(srv, "flux_dit_merged_calls_total") == merged_before
    for label in CASES:
        assert np.array_equal(images[label], alone[label]), label
    # the same adapters do merge (batched kernels: within one level of alone)
    same = []
    threads = [threading.Thread(target=lambda: same.append(_served_image(srv, *CASES["style"])))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert metric(srv, "flux_dit_merged_calls_total") > merged_before
    assert all(np.abs(image.astype(int) - alone["style"]).max() <= 1 for image in same)


def test_onnx_backend_refuses_adapters_naming_the_field(served_onnx):
    result = served_generate(served_onnx["schnell"], dict(SMALL, lora=["style"]))
    assert result.kinds == ["error"] and "`lora`" in result.error and "has none" in result.error


def test_gateway_takes_loras_and_lists_them(served):
    from flux_triton.gateway.app import GatewaySettings
    from tests.gateway_server import RunningGateway

    srv = served["schnell"]
    with RunningGateway(GatewaySettings(triton_url=srv.url)) as gateway:
        status, body, _ = gateway.post("/v1/images/generations", {
            "prompt": "a red circle", "size": "96x64", "steps": 3, "seed": 5, "n": 2,
            "loras": [{"name": "style", "scale": 0.75}]})
        assert status == 200, body
        status, listing, _ = gateway.get("/v1/loras")
        assert status == 200 and [a["name"] for a in json.loads(listing)["loras"]] == ["style", "texture"]
        status, error, _ = gateway.post("/v1/images/generations", {
            "prompt": "a", "size": "64x64", "steps": 2, "loras": [{"name": "sketch"}]})
        assert status == 400 and error["error"]["param"] == "loras"
        assert "sketch" in error["error"]["message"] and "texture" in error["error"]["message"]
    import base64
    import io

    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][1]["b64_json"]))))
    reference = served_generate(srv, dict(prompt="a red circle", height=64, width=96,
                                          num_inference_steps=3, seed=5, num_images_per_prompt=2,
                                          lora=["style"], lora_scale=[0.75]))
    assert np.array_equal(image, reference.image[1])


@pytest.mark.fast
def test_adapters_leave_the_base_weights_bit_exact(model_dirs):
    """Loading every adapter (and switching them) changes nothing for requests without one."""
    info = load_model_info(model_dirs["schnell"])
    plain = TorchFluxModels(info)
    adapted = TorchFluxModels(info, loras=read_catalog(model_dirs["schnell"] / "loras"))
    request = _request(info)
    with torch.inference_mode():
        first = list(run_in_process(request, info, plain))[-1].image
        list(run_in_process(_request(info, *CASES["style+texture"]), info, adapted))
        again = list(run_in_process(request, info, adapted))[-1].image
    assert torch.equal(first, again)


# -- merged into the weights (the GPU path under compile, CUDA graphs and FP8) -----------------

@pytest.mark.fast
@pytest.mark.parametrize("slots", [None, 1, 2])
@pytest.mark.parametrize("name,part", [("dit_transformer", "transformer"), ("clip_encoder", "text_encoder")])
def test_merged_adapters_equal_peft_layers_and_restore_the_base(model_dirs, name, part, slots):
    """Merging W_base + scale * B @ A into the weights computes what diffusers' peft layers compute
    (float32: to rounding), in place (no tensor moves, so compiled code and captured graphs stay
    valid), and without adapters the weights are the folder's again, bit for bit. With slots (the
    merge programs a GPU captures, run as they are here) and layer by layer beyond them."""
    from peft.tuners.lora import LoraLayer

    from flux_triton.runtime.acceleration import sample_inputs
    from flux_triton.runtime.loras import AdapterSwitch, MergedAdapters
    from flux_triton.runtime.torch_components import load_component
    from flux_triton.specs import ServingShape

    info = load_model_info(model_dirs["schnell"])
    catalog = read_catalog(model_dirs["schnell"] / "loras")
    plain = load_component(name, info)
    with_peft = load_component(name, info)
    switch = AdapterSwitch(with_peft.model, part, catalog)
    merged_network = load_component(name, info)
    merged = MergedAdapters(merged_network.model, part, catalog)
    if slots:
        merged.prepare_slots(slots)
    assert not any(isinstance(m, LoraLayer) for m in merged_network.model.modules())
    expected_layers = 16 if part == "transformer" else 4  # texture adapts CLIP's q_proj, v_proj
    assert len(merged.low_rank) >= expected_layers
    weights = dict(merged_network.model.named_parameters())
    addresses = {k: v.data_ptr() for k, v in weights.items()}
    inputs = sample_inputs(name, info, ServingShape(1, 64, 64, 16), "cpu", "FP32")
    if name == "clip_encoder":
        ids = torch.Generator().manual_seed(0)
        inputs["input_ids"] = torch.randint(0, 30, inputs["input_ids"].shape, generator=ids)
    output = next(iter(plain(**inputs)))
    with torch.inference_mode():
        base = plain(**inputs)[output]
        for adapters in [(("style", 0.75),), (("style", 0.5), ("texture", 1.5)), (("texture", -1.0),), ()]:
            switch.apply(adapters)
            merged.apply(adapters)
            reference, ours = with_peft(**inputs)[output], merged_network(**inputs)[output]
            torch.testing.assert_close(ours, reference, rtol=2e-5, atol=2e-5)
            if merged.active:
                assert not torch.equal(ours, base), adapters
        assert torch.equal(merged_network(**inputs)[output], base)
    assert {k: v.data_ptr() for k, v in weights.items()} == addresses
    for key, value in plain.model.state_dict().items():
        assert torch.equal(merged_network.model.state_dict()[key], value), key


@pytest.mark.fast
def test_a_failed_merge_is_redone_by_the_next_call(model_dirs, monkeypatch):
    """A switch that fails part-way (e.g. out of memory) does not leave mixed weights looking like
    the adapters of before: the next call, with the old adapters or the new, gets exactly them."""
    from flux_triton.runtime.acceleration import sample_inputs
    from flux_triton.runtime.loras import MergedAdapters
    from flux_triton.runtime.torch_components import load_component
    from flux_triton.specs import ServingShape

    info = load_model_info(model_dirs["schnell"])
    catalog = read_catalog(model_dirs["schnell"] / "loras")
    network = load_component("dit_transformer", info)
    merged = MergedAdapters(network.model, "transformer", catalog)
    inputs = sample_inputs("dit_transformer", info, ServingShape(1, 64, 64, 16), "cpu", "FP32")
    with torch.inference_mode():
        base = network(**inputs)["noise_pred"]
        merged.apply((("style", 1.0),))
        expected = network(**inputs)["noise_pred"]
        merged.apply(())
        write, calls = merged._write, []

        def failing(name, up, down):  # the third layer's merge runs out of memory
            calls.append(name)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("injected")
            write(name, up, down)

        monkeypatch.setattr(merged, "_write", failing)
        with pytest.raises(torch.OutOfMemoryError):
            merged.apply((("style", 1.0),))
        monkeypatch.setattr(merged, "_write", write)
        merged.apply(())  # the set before the failed switch: the layers must be restored anyway
        assert torch.equal(network(**inputs)["noise_pred"], base)
        merged.apply((("style", 1.0),))
        assert torch.equal(network(**inputs)["noise_pred"], expected)
