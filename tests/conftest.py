"""Shared fixtures: the tiny model folders, and real tritonservers serving them."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from devtools.processes import free_port
from devtools.tiny_models import build_tiny_flux
from flux_triton.export.repository import write_repository
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.server.launcher import TritonServer
from tests.reference import REPO_ROOT, SHAPES_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = ("schnell", "dev")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """models/tiny-flux-{schnell,dev} from `make model`, else built fresh for this session."""
    dirs = {}
    for variant in VARIANTS:
        path = REPO_ROOT / "models" / f"tiny-flux-{variant}"
        if not (path / "model_index.json").exists():
            path = build_tiny_flux(tmp_path_factory.mktemp("models") / f"tiny-flux-{variant}", variant)
        dirs[variant] = path
    return dirs


@pytest.fixture(scope="session")
def kontext_dir(tmp_path_factory) -> Path:
    """models/tiny-flux-kontext from `make model` (a tiny FluxKontextPipeline), else built fresh."""
    path = REPO_ROOT / "models" / "tiny-flux-kontext"
    if not (path / "model_index.json").exists():
        path = build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-kontext", "kontext")
    return path


@pytest.fixture(scope="session")
def flux2_dirs(tmp_path_factory) -> dict[str, Path]:
    """models/tiny-flux2-{klein,dev} from `make model`, else built fresh for this session."""
    dirs, built = {}, None
    for variant in ("klein", "dev"):
        path = REPO_ROOT / "models" / f"tiny-flux2-{variant}"
        if not (path / "model_index.json").exists():  # both in one folder, as `make model` puts them
            built = built or tmp_path_factory.mktemp("models")
            path = build_tiny_flux(built / path.name, f"flux2-{variant}")
        dirs[variant] = path
    return dirs


@pytest.fixture(scope="session")
def flux2_pipes(flux2_dirs):
    """diffusers' own Flux2KleinPipeline and Flux2Pipeline on the tiny FLUX.2 folders."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    return {"klein": Flux2KleinPipeline.from_pretrained(flux2_dirs["klein"]),
            "dev": Flux2Pipeline.from_pretrained(flux2_dirs["dev"])}


@pytest.fixture(scope="session")
def diffusers_pipes(model_dirs):
    """diffusers' own FluxPipeline on each model folder: the reference."""
    from diffusers import FluxPipeline

    return {v: FluxPipeline.from_pretrained(d) for v, d in model_dirs.items()}


@dataclass
class Served:
    variant: str
    info: FluxModelInfo
    server: TritonServer
    url: str
    ready_s: float
    trace_file: Path

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url)

    def traces(self) -> list[dict]:
        """Triton's TIMESTAMPS traces written so far."""
        events = []
        for path in sorted(self.trace_file.parent.glob(self.trace_file.name + "*")):
            text = path.read_text().strip()
            if text:
                events += json.loads(text if text.endswith("]") else text + "]")
        return events


def _start(variant: str, model_dir: Path, root: Path, backend: str = "torch", env=None,
           **options) -> Served:
    repo = write_repository(model_dir, root / "repository", backend=backend, **options)
    trace = root / "trace.json"
    ports = [free_port() for _ in range(3)]
    server = TritonServer(
        repo, *ports, log_file=root / "tritonserver.log",
        extra_args=[f"--trace-config=triton,file={trace}", "--trace-config=level=TIMESTAMPS",
                    "--trace-config=rate=1", "--trace-config=count=-1",
                    "--trace-config=triton,log-frequency=1"],
        extra_env=env or {},
    )
    ready_s = server.start()
    return Served(variant, load_model_info(model_dir), server, f"127.0.0.1:{ports[1]}", ready_s, trace)


def _stop(served: Served) -> bool:
    """Stop the server; True when it exited cleanly and left no process of its group behind."""
    code = served.server.stop()
    pid = served.server.process.pid
    leftovers = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    if leftovers:
        subprocess.run(["kill", "-9", *leftovers], check=False)
    if code != 0 or leftovers:
        print(f"tritonserver exit code {code}, leftover processes {leftovers}; "
              f"see {served.server.log_file}")
        if code != 0:  # CI keeps no files: the log's end is the only trace of a crash
            print("".join(Path(served.server.log_file).read_text(errors="replace").splitlines(True)[-60:]))
    return code == 0 and not leftovers


class LazyServers(Mapping):
    """A tritonserver per model variant, started on first use (so a test run that needs one
    variant starts one server)."""

    def __init__(self, start, variants):
        self._start, self._variants, self.started = start, tuple(variants), {}

    def __getitem__(self, variant: str) -> Served:
        if variant not in self._variants:
            raise KeyError(variant)
        if variant not in self.started:
            self.started[variant] = self._start(variant)
        return self.started[variant]

    def __iter__(self):
        return iter(self._variants)

    def __len__(self) -> int:
        return len(self._variants)


def _serve_variants(model_dirs, tmp_path_factory, backend: str, variants=VARIANTS, **options):
    """A tritonserver per tiny model variant (started when first used), stopped and checked for
    leftover processes and shared memory at the end."""

    def start(variant: str) -> Served:
        root = tmp_path_factory.mktemp(f"{variant}-{backend}")
        served = _start(variant, model_dirs[variant], root, backend, **options)
        assert served.server.shm_regions()  # the python backend's, named by this server
        return served

    servers = LazyServers(start, variants)
    try:
        yield servers
    finally:
        stopped = [_stop(srv) for srv in servers.started.values()]
    assert all(stopped)
    left = [region for srv in servers.started.values() for region in srv.server.removed_regions]
    assert not left, f"tritonserver left its shared memory in /dev/shm: {left}"


@pytest.fixture(scope="session")
def served(model_dirs, tmp_path_factory) -> dict[str, Served]:
    """Both tiny models served by PyTorch Python models."""
    yield from _serve_variants(model_dirs, tmp_path_factory, "torch")


@pytest.fixture(scope="session")
def served_onnx(model_dirs, tmp_path_factory) -> dict[str, Served]:
    """Both tiny models exported to ONNX (checked) and served by onnxruntime Python models."""
    yield from _serve_variants(model_dirs, tmp_path_factory, "onnx")


@pytest.fixture(scope="session")
def shapes_pipe():
    """diffusers' FluxPipeline on the trained default model, upcast as the server loads it."""
    import torch
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(SHAPES_DIR, dtype=torch.float32)


@pytest.fixture(scope="session")
def served_shapes(tmp_path_factory) -> Served:
    """The trained default model served by PyTorch Python models."""
    for servers in _serve_variants({"shapes": SHAPES_DIR}, tmp_path_factory, "torch", ("shapes",)):
        yield servers["shapes"]


@pytest.fixture(scope="session")
def served_flux2(flux2_dirs, tmp_path_factory) -> dict[str, Served]:
    """The tiny FLUX.2 klein and dev models served by PyTorch Python models."""
    yield from _serve_variants(flux2_dirs, tmp_path_factory, "torch", ("klein", "dev"))


@pytest.fixture(scope="session")
def served_kontext(kontext_dir, tmp_path_factory) -> Served:
    """The tiny Kontext model served by PyTorch Python models."""
    for servers in _serve_variants({"kontext": kontext_dir}, tmp_path_factory, "torch", ("kontext",)):
        yield servers["kontext"]


@pytest.fixture(scope="session")
def served_faulty(model_dirs, tmp_path_factory):
    """The schnell model served with test-only fault injection enabled (FLUX_TRITON_FAULT_DIR)."""
    from flux_triton.adapters.faults import FAULTS_ENV
    from flux_triton.serving_config import RetryPolicy

    fault_dir = tmp_path_factory.mktemp("faults")
    for servers in _serve_variants(model_dirs, tmp_path_factory, "torch", ("schnell",),
                                   env={FAULTS_ENV: str(fault_dir)},
                                   retry=RetryPolicy(attempts=3, backoff_s=0.01)):
        servers["schnell"].fault_dir = fault_dir
        yield servers["schnell"]


@pytest.fixture(scope="session")
def served_batched(model_dirs, tmp_path_factory):
    """The schnell model served with DiT batching across requests on (BATCH_DELAY_US=20000) and
    fault injection enabled."""
    from flux_triton.adapters.faults import FAULTS_ENV

    fault_dir = tmp_path_factory.mktemp("batched-faults")
    for servers in _serve_variants(model_dirs, tmp_path_factory, "torch", ("schnell",),
                                   env={FAULTS_ENV: str(fault_dir)}, batch_delay_us=20000):
        servers["schnell"].fault_dir = fault_dir
        yield servers["schnell"]


@pytest.fixture
def faults(served_faulty):
    """The fault-injecting server, with every injected fault cleared after the test."""
    yield served_faulty
    for plan in served_faulty.fault_dir.glob("*.json"):
        plan.unlink()


@pytest.fixture(scope="module")
def gateway(served_shapes):
    """The HTTP gateway in front of the shapes server, for one test module."""
    from flux_triton.gateway.app import GatewaySettings
    from tests.gateway_server import RunningGateway

    with RunningGateway(GatewaySettings(triton_url=served_shapes.url)) as running:
        yield running
