"""The rendered model repository: relocatable, and an export never deletes another backend's
artifacts; the launcher's address and device options."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from devtools.processes import free_port
from flux_triton.export.repository import write_repository
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.server.launcher import CUDA_POOL_BYTES, TritonServer
from flux_triton.specs import NETWORKS
from tests.reference import raw_inputs, served_generate

FIELDS = dict(prompt="a lighthouse on a cliff", height=64, width=64, num_inference_steps=2, seed=11)


def _in_process_image(model_dir: Path) -> np.ndarray:
    info = load_model_info(model_dir)
    events = run_in_process(validate_request(raw_inputs(**FIELDS), info), info, TorchFluxModels(info))
    return next(e for e in events if isinstance(e, FinalImage)).image.numpy()


class _Served:
    def __init__(self, server: TritonServer):
        self.server = server

    def client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(f"127.0.0.1:{self.server.grpc_port}")


def _serve_once(repository: Path, model_dir: Path | None = None) -> np.ndarray:
    ports = [free_port() for _ in range(3)]
    with TritonServer(repository, *ports, log_file=repository.parent / "server.log",
                      model_dir=model_dir) as server:
        result = served_generate(_Served(server), FIELDS, timeout_s=60)
        assert any(server.load_board.iterdir())  # flux_bls publishes its load here
    assert not server.load_board.exists()  # and the server's stop removes it
    assert result.error is None, result.error
    return result.image


def test_repository_moves_with_its_model_or_is_pointed_at_one(model_dirs, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(model_dirs["schnell"], site / "model")
    write_repository(site / "model", site / "repository")
    config = (site / "repository" / "flux_bls" / "config.pbtxt").read_text()
    assert '\\"model_dir\\": \\"../model\\"' in config and str(tmp_path) not in config

    moved = tmp_path / "elsewhere" / "site"
    moved.parent.mkdir()
    site.rename(moved)
    expected = _in_process_image(model_dirs["schnell"])
    assert np.array_equal(_serve_once(moved / "repository"), expected)

    # The repository alone, mounted where its relative model_dir leads nowhere: given at serve time.
    lone = tmp_path / "mounted" / "repository"
    shutil.move(moved / "repository", lone)
    assert not (lone.parent / "model").exists()
    assert np.array_equal(_serve_once(lone, model_dir=moved / "model"), expected)


@pytest.mark.fast
def test_export_keeps_other_backends_artifacts(model_dirs, tmp_path, capsys):
    repository = tmp_path / "repository"
    plan = repository / "dit_transformer" / "1" / "model.plan"
    graph = repository / "vae_decoder" / "1" / "model.onnx"
    for artifact in (plan, graph):
        artifact.parent.mkdir(parents=True)
        artifact.write_bytes(b"built for hours")
    write_repository(model_dirs["schnell"], repository, backend="torch")
    assert plan.read_bytes() == graph.read_bytes() == b"built for hours"
    printed = capsys.readouterr().out
    assert "kept dit_transformer/1/model.plan" in printed and "kept vae_decoder/1/model.onnx" in printed


@pytest.mark.fast
@pytest.mark.parametrize("backend", ["onnx", "tensorrt"])
def test_every_network_is_served_from_its_artifact(model_dirs, tmp_path, monkeypatch, backend):
    """The onnx backend exports each network (the VAE encoder too) into its model's folder and
    serves it with onnxruntime; the tensorrt backend builds a plan of each from its graph, with
    that network's profile, and serves the plan (export and build recorded, not run)."""
    import flux_triton.export.repository as repository
    import flux_triton.export.tensorrt_build as tensorrt_build
    from flux_triton.export.onnx_export import onnx_paths
    from flux_triton.export.profiles import load_engine_config
    from flux_triton.specs import component_specs

    exported, built = {}, {}

    def export_all(model_dir, targets, report_path, onnx_precision):
        exported.update(targets)

    def build_plan(onnx_path, plan_path, spec, config, timing_cache, onnx_precision):
        built[spec.name] = (onnx_path, plan_path, config.profile(spec))
        return 0.0

    monkeypatch.setattr(repository, "export_all", export_all)
    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_build, "build_plan", build_plan)
    device = "gpu" if backend == "tensorrt" else "cpu"
    dest = write_repository(model_dirs["dev"], tmp_path / "repository", backend=backend,
                            onnx_dir=tmp_path / "onnx", device=device)
    rendered = repository.render_repository(model_dirs["dev"], backend=backend, repository=dest,
                                            device=device)
    info = load_model_info(model_dirs["dev"])
    if backend == "onnx":
        assert exported == {name: dest / name / "1" / "model.onnx" for name in NETWORKS}
        assert not built
        assert all(rendered.options[name].backend == "onnx" for name in NETWORKS)
        assert all((dest / name / "1" / "model.py").exists() for name in NETWORKS)
    else:
        graphs = onnx_paths((tmp_path / "onnx").resolve())
        assert exported == graphs
        config, specs = load_engine_config(info), component_specs(info)
        assert built == {name: (graphs[name], dest / name / "1" / "model.plan",
                                config.profile(specs[name])) for name in NETWORKS}
        assert not any(name in rendered.options for name in NETWORKS)
        for name in NETWORKS:
            text = (dest / name / "config.pbtxt").read_text()
            assert 'platform: "tensorrt_plan"' in text
    encoder = (dest / "vae_encoder" / "config.pbtxt").read_text()
    assert all(f'name: "{t}"' in encoder for t in ("image", "noise", "latents"))


@pytest.mark.fast
def test_launcher_listens_where_told_and_knows_gpu_repositories(model_dirs, tmp_path, monkeypatch):
    import flux_triton.server.launcher as launcher

    monkeypatch.setattr(launcher, "prepare_backends", lambda: tmp_path)
    monkeypatch.setattr(launcher, "gpu_ids", lambda: [0, 1])
    cpu_repo = write_repository(model_dirs["schnell"], tmp_path / "cpu")
    gpu_repo = write_repository(model_dirs["schnell"], tmp_path / "gpu", device="gpu",
                                precision="BF16")

    default = TritonServer(cpu_repo).command()
    assert "--http-address=127.0.0.1" in default and "--allow-gpu-metrics=false" in default
    everywhere = TritonServer(cpu_repo, host="0.0.0.0")
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(
        everywhere.command())
    assert everywhere.local_host == "127.0.0.1"

    gpu = TritonServer(gpu_repo).command()
    assert "--allow-gpu-metrics=true" in gpu
    assert {f"--cuda-memory-pool-byte-size={i}:{CUDA_POOL_BYTES}" for i in (0, 1)} <= set(gpu)
    assert "--allow-gpu-metrics=true" in TritonServer(cpu_repo, device="gpu").command()
    env = TritonServer(cpu_repo, model_dir=model_dirs["dev"]).environment()
    assert env["FLUX_TRITON_MODEL_DIR"] == str(model_dirs["dev"])


@pytest.mark.fast
def test_random_weights_are_an_explicit_choice_and_said(model_dirs, tmp_path, capsys):
    """A folder of configs without weights (random_weights.json) is refused unless the export
    says RANDOM_WEIGHTS=1; then every model's options, the repository and the adapters' log say
    so, and a component refuses a folder that does not match what it was exported for."""
    from flux_triton.adapters.components import ComponentModel
    from flux_triton.export.repository import main as export_main
    from flux_triton.export.repository import render_repository
    from flux_triton.runtime.torch_components import RANDOM_WEIGHTS_MARKER
    from tests import python_backend_stub as pb

    folder = shutil.copytree(model_dirs["schnell"], tmp_path / "configs-only")
    (folder / RANDOM_WEIGHTS_MARKER).write_text(json.dumps({"dtype": "float32"}))
    with pytest.raises(ValueError, match="RANDOM_WEIGHTS=1 to serve random weights"):
        render_repository(folder)
    assert export_main(["--model-dir", str(folder), "--repository", str(tmp_path / "refused")]) == 1
    assert "RANDOM_WEIGHTS=1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has weights: leave RANDOM_WEIGHTS unset"):
        render_repository(model_dirs["schnell"], random_weights=True)

    rendered = render_repository(folder, random_weights=True)
    assert rendered.deployment.random_weights and rendered.options["flux_bls"].random_weights
    assert all(o.random_weights for n, o in rendered.options.items() if n != "tokenizer")
    dit = type("Dit", (ComponentModel,), {"pb": pb, "name": "dit_transformer"})()
    pb.Logger.lines.clear()
    dit.initialize(pb.model_args(tmp_path, "dit_transformer", replace(
        rendered.options["dit_transformer"], model_dir=str(folder))))
    assert any("serving RANDOM weights" in message for _level, message in pb.Logger.lines)
    with pytest.raises(ValueError, match="export it again"):  # exported for weights, given none
        dit.initialize(pb.model_args(tmp_path, "dit_transformer", replace(
            rendered.options["dit_transformer"], model_dir=str(folder), random_weights=False)))


@pytest.mark.fast
def test_gateway_health_says_random_weights():
    from flux_triton.gateway.app import GatewaySettings, create_app
    from flux_triton.serving_config import BlsOptions
    from tests.gateway_server import RunningGateway

    class Ready:
        async def ready(self):
            return True

        async def options(self):
            return BlsOptions("m", random_weights=True)

    app = create_app(GatewaySettings(triton_url="127.0.0.1:1"))
    app.state.triton = Ready()
    with RunningGateway(None, app) as gateway:
        status, payload, _ = gateway.get("/healthz")
    assert status == 200 and json.loads(payload) == {"status": "ready", "weights": "random"}
