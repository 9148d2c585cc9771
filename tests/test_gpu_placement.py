"""Several GPUs on one host (GPUS): the rendered repository gives every listed GPU a copy of each
network and a flux_bls instance, and a flux_bls instance calls the copies on its own GPU.

All on the CPU: configs are text, and a flux_bls instance's GPU is only what its args say.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import flux_triton.export.repository as export_repository
from flux_triton.export.repository import (
    RenderedRepository,
    count_gpus,
    render_repository,
    share_artifacts,
    write_repository,
)
from flux_triton.placement import parse_gpus
from flux_triton.server.launcher import CUDA_POOL_BYTES, TritonServer
from flux_triton.server.supervisor import Supervisor
from flux_triton.serving_config import NetworkOptions, RepositoryConfig, read_options
from flux_triton.specs import NETWORKS
from tests import python_backend_stub as pb

pytestmark = pytest.mark.fast
PLAIN = {"tokenizer", "encode_prompt", "flux_bls", *NETWORKS}
GPU_OPTIONS = dict(device="gpu", precision="BF16", compile=True, warmup=None, batch_delay_us=2000)


@pytest.fixture(scope="module")
def render(model_dirs):
    """render(gpus) -> configs of the tiny schnell model on GPUs (cached per GPUS)."""
    rendered = {}

    def render(gpus: str | None = None) -> RenderedRepository:
        if gpus not in rendered:
            rendered[gpus] = render_repository(model_dirs["schnell"], gpus=gpus, **GPU_OPTIONS)
        return rendered[gpus]

    return render


def _deployed(rendered: RenderedRepository) -> dict:
    return {model.name: model for model in rendered.deployment.models}


def instance_groups(config: str) -> list[tuple[int, str, list[int] | None]]:
    """(count, kind, gpus or None) of each instance group of a rendered config.pbtxt."""
    groups = re.findall(r"\{\n    count: (\d+)\n    kind: (\w+)\n(?:    gpus: \[ ([\d, ]+) \]\n)?  \}",
                        config)
    return [(int(count), kind, [int(g) for g in gpus.split(",")] if gpus else None)
            for count, kind, gpus in groups]


@pytest.mark.parametrize("gpus,ids", [("0,1", [0, 1]), ("0,1,2,3", [0, 1, 2, 3]), ("2,5", [2, 5])])
def test_each_listed_gpu_gets_its_copies_and_a_bls_instance(render, gpus, ids):
    rendered = render(gpus)
    configs = rendered.texts
    copies = {f"{n}_gpu{k}" for n in NETWORKS for k in ids[1:]}
    assert set(configs) == set(rendered.deployment.names) == PLAIN | copies
    for network in NETWORKS:
        for gpu in ids:
            name = network if gpu == ids[0] else f"{network}_gpu{gpu}"
            assert configs[name].startswith(f'name: "{name}"\n')
            assert instance_groups(configs[name]) == [(1, "KIND_GPU", [gpu])]
            assert _deployed(rendered)[name].gpus == (gpu,)
            # Every copy is the same model, options included (precision, compile, warmup, cache).
            assert rendered.options[name] == rendered.options[network]
            assert rendered.options[name].network == network
    assert instance_groups(configs["tokenizer"]) == [(1, "KIND_CPU", None)]
    assert instance_groups(configs["flux_bls"]) == [(1, "KIND_GPU", [gpu]) for gpu in ids]
    assert _deployed(rendered)["flux_bls"].processes == len(ids)
    mapping = rendered.options["flux_bls"].networks_by_gpu
    assert mapping == {str(gpu): {n: n if gpu == ids[0] else f"{n}_gpu{gpu}" for n in NETWORKS}
                       for gpu in ids}
    assert read_options(type(rendered.options["flux_bls"]), {
        "name": "flux_bls", "parameters": _parameters(configs["flux_bls"])}) == rendered.options["flux_bls"]
    steps = re.findall(r'model_name: "(\w+)"', configs["encode_prompt"])
    assert steps == ["tokenizer", "clip_encoder", "t5_encoder"]  # the first GPU's, by plain name


def _parameters(config: str) -> dict:
    """The string parameters of a config.pbtxt, as Triton hands them to a model (JSON form)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    parsed = text_format.Parse(config, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(parsed, preserving_proto_field_name=True)["parameters"]


def test_tensorrt_plans_are_placed_alike(model_dirs):
    configs = render_repository(model_dirs["dev"], backend="tensorrt", device="gpu", gpus="0,1").texts
    for network in NETWORKS:
        assert instance_groups(configs[network]) == [(1, "KIND_GPU", [0])]
        assert instance_groups(configs[f"{network}_gpu1"]) == [(1, "KIND_GPU", [1])]
        assert 'platform: "tensorrt_plan"' in configs[f"{network}_gpu1"]
    assert instance_groups(configs["flux_bls"]) == [(1, "KIND_GPU", [0]), (1, "KIND_GPU", [1])]


def test_gpus_all_is_every_gpu_the_machine_has(model_dirs, monkeypatch):
    monkeypatch.setattr(export_repository, "count_gpus", lambda: 3)
    configs = render_repository(model_dirs["schnell"], gpus="all", **GPU_OPTIONS).texts
    assert set(configs) == PLAIN | {f"{n}_gpu{k}" for n in NETWORKS for k in (1, 2)}
    assert instance_groups(configs["flux_bls"]) == [(1, "KIND_GPU", [k]) for k in (0, 1, 2)]


def test_gpu_count_from_torch_else_nvidia_smi(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    listing = "GPU 0: NVIDIA H100 (UUID: GPU-a)\nGPU 1: NVIDIA H100 (UUID: GPU-b)\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, listing))
    assert count_gpus() == 2

    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(ValueError, match="GPUS=all: neither torch nor nvidia-smi finds a GPU"):
        parse_gpus("all", count_gpus)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parse_gpus("all", count_gpus) == (0, 1, 2, 3)


def test_without_gpus_the_configs_are_as_before(render):
    default = render()
    assert set(default.texts) == PLAIN
    assert not any("gpus:" in c for c in default.texts.values())
    assert default.deployment.gpus == set() and default.options["flux_bls"].networks_by_gpu is None
    # One GPU listed: the same models, only pinned to it.
    one = render("0")
    assert one.options["flux_bls"].networks_by_gpu == {"0": {n: n for n in NETWORKS}}
    assert {n: o for n, o in one.options.items() if n != "flux_bls"} == \
        {n: o for n, o in default.options.items() if n != "flux_bls"}
    pinned = render("0,1")  # and the first of several: the same models but flux_bls, pinned
    for name in PLAIN - {"flux_bls", "encode_prompt"}:
        assert pinned.options[name] == default.options[name]
        assert _deployed(pinned)[name].kind == _deployed(default)[name].kind


@pytest.mark.parametrize("gpus,problem", [
    ("x", "'x' in 'x' is not a GPU id"), ("-1", "'-1' in '-1' is not a GPU id"),
    ("0,,1", "'' in '0,,1' is not a GPU id"), ("0,1,0", "GPU 0 twice"), ("", "GPUS is empty"),
    (" ", "GPUS is empty"),
])
def test_invalid_gpus_fail_naming_gpus(gpus, problem):
    with pytest.raises(ValueError, match="GPUS") as failure:
        parse_gpus(gpus, lambda: 8)
    assert problem in str(failure.value)


def test_invalid_gpus_stop_the_export(model_dirs, tmp_path, capsys):
    with pytest.raises(ValueError, match="GPUS lists GPU 1 twice"):
        render_repository(model_dirs["schnell"], device="gpu", gpus="1,1")
    with pytest.raises(ValueError, match="GPUS places the models on GPUs: export with DEVICE=gpu"):
        render_repository(model_dirs["schnell"], gpus="0,1")
    code = export_repository.main(["--model-dir", str(model_dirs["schnell"]), "--repository",
                                   str(tmp_path / "repository"), "--device", "gpu", "--gpus", "x"])
    assert code == 1 and "GPUS lists GPU ids" in capsys.readouterr().err
    assert not (tmp_path / "repository").exists()


def test_export_writes_the_copies_and_removes_those_no_longer_listed(model_dirs, tmp_path, monkeypatch):
    # `make export` writes into the source repository itself: a copy of it stands in here.
    source = tmp_path / "model_repository"
    shutil.copytree(export_repository.SOURCE_REPOSITORY, source,
                    ignore=shutil.ignore_patterns("config.pbtxt", "__pycache__", "model.onnx*",
                                                  "model.plan", "export_report.json"))
    monkeypatch.setattr(export_repository, "SOURCE_REPOSITORY", source)
    write_repository(model_dirs["schnell"], source, device="gpu", gpus="0,1,2")
    for network in NETWORKS:
        code = (source / network / "1" / "model.py").read_text()
        for gpu in (1, 2):
            assert (source / f"{network}_gpu{gpu}" / "1" / "model.py").read_text() == code
            assert (source / f"{network}_gpu{gpu}" / "config.pbtxt").exists()

    write_repository(model_dirs["schnell"], source, device="gpu", gpus="0,2")
    assert not any(source.glob("*_gpu1")) and len(list(source.glob("*_gpu2"))) == len(NETWORKS)
    write_repository(model_dirs["schnell"], source, device="gpu")
    # the source repository also holds the code of FLUX.2's text encoder, with no config
    assert {p.name for p in source.iterdir() if p.is_dir()} == PLAIN | {"text_encoder"}
    assert not (source / "text_encoder" / "config.pbtxt").exists()


def test_copies_share_their_networks_plans(tmp_path):
    plan = tmp_path / "dit_transformer" / "1" / "model.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"built for hours")
    (tmp_path / "dit_transformer_gpu3" / "1").mkdir(parents=True)
    share_artifacts(tmp_path, "tensorrt", ["tokenizer", "dit_transformer", "dit_transformer_gpu3"])
    shared = tmp_path / "dit_transformer_gpu3" / "1" / "model.plan"
    assert shared.read_bytes() == b"built for hours" and shared.stat().st_ino == plan.stat().st_ino


def test_server_loads_what_was_rendered_with_a_pool_on_each_gpu(model_dirs, tmp_path, monkeypatch):
    import flux_triton.server.launcher as launcher

    monkeypatch.setattr(launcher, "prepare_backends", lambda: tmp_path)
    monkeypatch.setattr(launcher, "gpu_ids", lambda: [])  # no nvidia-smi: the configs still say
    repository = write_repository(model_dirs["schnell"], tmp_path / "repository", device="gpu",
                                  gpus="2,5")
    (repository / "left_over" / "1").mkdir(parents=True)  # not a rendered model: never loaded
    command = TritonServer(repository).command()
    loaded = {arg.split("=", 1)[1] for arg in command if arg.startswith("--load-model=")}
    assert loaded == PLAIN | {f"{n}_gpu5" for n in NETWORKS}
    pools = {arg for arg in command if arg.startswith("--cuda-memory-pool-byte-size=")}
    assert pools == {f"--cuda-memory-pool-byte-size={gpu}:{CUDA_POOL_BYTES}" for gpu in (2, 5)}
    assert "--allow-gpu-metrics=true" in command

    models = RepositoryConfig.read(repository).python_models()
    assert models["dit_transformer_gpu5"].processes == 1 and not models["dit_transformer_gpu5"].decoupled
    assert models["flux_bls"].processes == 2 and models["flux_bls"].decoupled


def test_supervisor_reloads_a_copy_by_its_own_name(model_dirs, tmp_path):
    class Server:  # what the supervisor asks of a TritonServer, recorded
        repository = write_repository(model_dirs["schnell"], tmp_path / "repository", device="gpu",
                                      gpus="0,1")
        process = None
        actions: list[tuple[str, str]] = []

        def model_control(self, model, action):
            self.actions.append((model, action))

        def is_ready(self):
            return True

    server = Server()
    supervisor = Supervisor(server)
    supervisor.recover("dit_transformer_gpu1", "process 42 is dead")
    assert server.actions == [("dit_transformer_gpu1", "unload"), ("dit_transformer_gpu1", "load")]
    assert supervisor.restarts["dit_transformer_gpu1"] == 1 and supervisor.server_restarts == 0


@pytest.fixture
def bls_on_gpu(model_dirs, render, tmp_path, monkeypatch):
    """wire(gpu, **params): flux_bls on that GPU with the GPUS=0,1 map; the networks registered
    under the names of GPU 1's copies (on the CPU)."""
    mapping = render("0,1").options["flux_bls"].networks_by_gpu

    def wire(gpu: int, **options):
        bls = pb.wire_repository(model_dirs["schnell"], tmp_path, bls_gpu=gpu,
                                 networks_by_gpu=mapping, **options)
        for network in NETWORKS:
            pb.models[f"{network}_gpu1"] = pb.models[network]
        monkeypatch.setattr(bls.metrics, "sample_gpu_memory", lambda: None)  # no CUDA here
        return bls

    yield wire
    pb.reset()


def _generate(bls, **fields) -> list:
    """Two text-to-image requests and an image-to-image one (so every network is called)."""
    requests = [pb.flux_bls_request(prompt="a red circle", height=64, width=64,
                                    num_inference_steps=2, seed=seed, **fields) for seed in (1, 2)]
    requests.append(pb.flux_bls_request(prompt="a red circle", num_inference_steps=2, seed=3,
                                        image=np.full((1, 64, 64, 3), 90, np.uint8), **fields))
    pb.serve(bls, requests)
    for request in requests:
        response, _ = request.sender.sent[-2]
        assert not response.has_error(), response.error().message()
    return pb.requested


@pytest.mark.parametrize("batch_delay_us", [0, 20000])
def test_bls_on_gpu_1_calls_the_copies_on_gpu_1(bls_on_gpu, batch_delay_us):
    bls = bls_on_gpu(1, batch_delay_us=batch_delay_us)
    requested = _generate(bls)
    assert {r.model_name for r in requested} == {"tokenizer", *(f"{n}_gpu1" for n in NETWORKS)}
    assert {r.preferred_memory.device_id for r in requested} == {1}  # outputs on its own GPU
    if batch_delay_us:
        assert bls.metrics.dit_merged.value > 0  # the two requests' DiT calls went as one
    # Its metrics count apart from other GPUs' instances; the component label stays the network.
    labels = [m.labels for family in bls.metrics.families for m in family.metrics]
    assert labels and all(label["gpu"] == "1" for label in labels)
    assert {"model": "dit_transformer", "gpu": "1"} in labels


def test_bls_on_the_first_gpu_calls_the_plain_names(bls_on_gpu):
    requested = _generate(bls_on_gpu(0))
    assert {r.model_name for r in requested} == {"tokenizer", *NETWORKS}
    assert {r.preferred_memory.device_id for r in requested} == {0}


def test_bls_on_an_unlisted_gpu_refuses_to_load(bls_on_gpu):
    with pytest.raises(ValueError, match=r"GPU 3 but networks_by_gpu maps only GPUs \['0', '1'\]"):
        bls_on_gpu(3)


def test_repository_without_gpus_calls_plain_names_from_any_gpu(model_dirs, tmp_path):
    bls = pb.wire_repository(model_dirs["schnell"], tmp_path, bls_gpu=1)
    bls.metrics.sample_gpu_memory = lambda: None
    try:
        assert {r.model_name for r in _generate(bls)} == {"tokenizer", *NETWORKS}
    finally:
        pb.reset()



def test_a_compiled_gpu_export_fills_the_cache_the_server_reads(model_dirs, tmp_path, monkeypatch):
    """`make export DEVICE=gpu` compiles every network on each listed GPU into the cache the
    rendered configs point the served networks at (flux_triton.export.precompile); without those GPUs it
    leaves the compile to the server."""
    import torch

    import flux_triton.export.precompile
    from flux_triton.adapters.components import acceleration_options

    calls = []
    monkeypatch.setattr(flux_triton.export.precompile, "precompile",
                        lambda info, options, warmup, gpus: calls.append((options, warmup, gpus)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("FLUX_TRITON_COMPILE_CACHE", raising=False)
    dest = tmp_path / "repository"
    write_repository(model_dirs["schnell"], dest, device="gpu", precision="FP8", gpus="0,2")
    [(options, warmup, gpus)] = calls
    assert gpus == (0, 2) and options.compile and options.precision == "FP8" and warmup
    config = (dest / "dit_transformer_gpu2" / "config.pbtxt").read_text()
    written = read_options(NetworkOptions, {"name": "dit_transformer_gpu2",
                                            "parameters": _parameters(config)})
    served = acceleration_options({"model_repository": str(dest / "dit_transformer_gpu2")}, written)
    assert Path(options.cache_dir).resolve() == Path(served.cache_dir).resolve()
    assert (options.compile, options.cuda_graphs) == (served.compile, served.cuda_graphs)
    assert tuple(map(str, warmup)) == written.warmup

    calls.clear()
    write_repository(model_dirs["schnell"], dest, device="gpu", gpus="0,3")  # no GPU 3 here
    write_repository(model_dirs["schnell"], dest, device="gpu", compile=False)
    write_repository(model_dirs["schnell"], dest, device="gpu", precompile=False)
    assert calls == []
    write_repository(model_dirs["schnell"], dest, device="gpu")  # unplaced: every GPU torch sees
    assert calls[0][2] == (0, 1, 2)


def _board(folder: Path, name: str, gpu: int | None, active: int = 0):
    from flux_triton.dispatch import LoadBoard

    board = LoadBoard(folder, name, gpu)
    board.add(active)
    return board


def test_the_servers_queue_is_bounded_over_every_instance(tmp_path):
    """MAX_QUEUE counts the requests waiting on every GPU's instance, live ones only."""
    gpu0, gpu1 = _board(tmp_path, "a", 0), _board(tmp_path, "b", 1)
    assert gpu0.join_queue(3) and gpu1.join_queue(3) and gpu1.join_queue(3)
    assert not gpu0.join_queue(3) and not gpu1.join_queue(3)
    assert gpu0.waiting_total() == gpu1.waiting_total() == 3
    gpu1.leave_queue()
    assert gpu0.join_queue(3) and gpu0.waiting == 2
    assert gpu1.join_queue(None)  # no bound
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "crashed").write_bytes(__import__("struct").pack("<qqqq", dead.pid, 0, 9, 9))
    assert gpu0.waiting_total() == 4  # a crashed instance's line is gone with it
    gpu1.close()
    assert gpu0.waiting_total() == 2
    gpu0.close()  # the last one out also removes the crashed one's file and the lock
    assert not tmp_path.exists()


def test_load_board_sums_live_instances_per_gpu(tmp_path):
    gpu0, gpu0_b, gpu1 = (_board(tmp_path, "a", 0, 2), _board(tmp_path, "b", 0, 1),
                          _board(tmp_path, "c", 1, 2))
    assert gpu0.loads_by_gpu() == {0: 3, 1: 2}
    assert gpu1.least_loaded() and not gpu0.least_loaded()
    gpu0.add(-2)
    assert gpu0.least_loaded() and not gpu1.least_loaded()
    gpu0_b.close()
    gpu0_b.add(-1)  # a request that ends after its instance closed: counted, not published
    gpu0_b.close()
    assert gpu1.loads_by_gpu() == {0: 0, 1: 2}
    # A crashed instance's requests are gone: its file no longer counts, and the next instance
    # to start removes it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    Path(tmp_path / "crashed").write_bytes(
        __import__("struct").pack("<qqqq", dead.pid, 1, 7, 3))
    assert gpu0.loads_by_gpu() == {0: 0, 1: 2}
    _board(tmp_path, "d", 2).close()
    assert not (tmp_path / "crashed").exists()
    for board in (gpu0, gpu1):
        board.close()


def test_a_lone_or_cpu_instance_never_waits(tmp_path):
    board = _board(tmp_path, "only", None, 5)
    assert board.wait_until_least_loaded(timeout_s=0)
    board.close()


def test_own_count_bounds_the_wait(tmp_path):
    """A file that claims requests it does not serve (a living pid that is not an instance's, or
    this instance's own file gone) can neither keep an instance waiting once its own requests are
    done, nor hide this instance's count."""
    mine = _board(tmp_path, "mine", 1, 1)
    stale = _board(tmp_path, "stale", 1, 5)  # this test's pid: alive
    idle = _board(tmp_path, "idle", 0)
    assert not mine.wait_until_least_loaded(timeout_s=0.02)  # 6 on GPU 1 against none on GPU 0
    mine.add(-1)
    assert mine.wait_until_least_loaded(timeout_s=0.02)
    mine.add(2)
    mine.path.unlink()
    assert idle.loads_by_gpu() == {0: 0, 1: 5} and mine.loads_by_gpu() == {1: 7, 0: 0}
    for board in (mine, stale, idle):
        board.close()


def test_execute_returns_only_once_its_gpu_is_least_loaded(bls_on_gpu, tmp_path, monkeypatch):
    """An instance whose GPU runs more than another stays inside `execute` (so Triton hands new
    requests to the other GPU's instance) until that changes; else it returns at once."""
    import threading

    bls = bls_on_gpu(1)
    bls.board.close()
    bls.board = _board(tmp_path, "gpu1", 1)
    idle_gpu0 = _board(tmp_path, "gpu0", 0)

    gauge = []
    bls.metrics.active_requests.set = gauge.append
    request = pb.flux_bls_request(prompt="a red circle", height=64, width=64,
                                  num_inference_steps=2, seed=1)
    bls.execute([request])  # GPU 0 has none: this returns only after the request ended
    assert request.sender.sent[-1][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert bls.board.active == 0 and gauge == [1, 0]  # flux_active_requests followed it

    idle_gpu0.add(3)  # GPU 0 busier: execute returns while the request runs
    dit = pb.models["dit_transformer_gpu1"]
    release, done = threading.Event(), threading.Event()
    run = dit.execute

    def held(requests):  # the DiT answers only once released
        release.wait(60)
        return run(requests)

    monkeypatch.setattr(dit, "execute", held)
    request = pb.flux_bls_request(prompt="a red circle", height=64, width=64,
                                  num_inference_steps=2, seed=2)
    request.sender.on_final = done.set
    bls.execute([request])
    assert not done.is_set() and bls.board.active == 1  # returned mid-request: GPU 1 takes more
    release.set()
    assert done.wait(60)
    response, _ = request.sender.sent[-2]
    assert not response.has_error(), response.error().message()
    idle_gpu0.close()
