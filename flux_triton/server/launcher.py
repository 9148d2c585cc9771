"""Start and stop the `tritonserver` shipped in the nvidia-pytriton wheel (loopback by default).

The python backend's stub runs the first `python3` on PATH, so the server is started with this
interpreter's bin directory first on PATH: the models then import this venv's packages.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from flux_triton.dispatch import board_folder
from flux_triton.server.supervisor import Supervisor
from flux_triton.serving_config import (
    LORA_DIR_ENV,
    MAX_INFLIGHT_ENV,
    MAX_QUEUE_ENV,
    MODEL_DIR_ENV,
    ConfigError,
    RepositoryConfig,
    parse_queue_limit,
)
from flux_triton.specs import PROBE_INPUT

# Per GPU: large enough that a 1024² DiT output (48 MiB) moves between models without CUDA IPC.
CUDA_POOL_BYTES = 256 * 1024 * 1024


# Triton's admin APIs, each callable only with the header ADMIN_HEADER: ADMIN_KEY_ENV's value, or a
# key drawn per server start that only this process (the supervisor) knows. model-repository loads
# and unloads models (a load can carry a model.py: arbitrary code), logging and trace change what
# the server writes and where, shared-memory maps regions by name into the server.
ADMIN_APIS = ("model-repository", "logging", "trace", "shared-memory")
# glibc's malloc keeps what tritonserver frees, so its RSS creeps up under load; jemalloc gives it
# back, as Triton's release notes advise (measurements: docs/operations.md, "Soak"). Preloaded
# where installed (Debian's libjemalloc2; Triton's container has it); FLUX_TRITON_MALLOC=system
# keeps glibc's.
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/x86_64-linux-gnu/libjemalloc.so", "/usr/lib64/libjemalloc.so.2")
MALLOC_ENV = "FLUX_TRITON_MALLOC"
ADMIN_HEADER = "flux-admin-key"
ADMIN_KEY_ENV = "FLUX_TRITON_ADMIN_KEY"
# The python backend's shared-memory regions in /dev/shm start with this, then the server's token.
SHM_PREFIX = "flux-triton-"
SHM_FOLDER = Path("/dev/shm")
PR_SET_PDEATHSIG = 1


class StartFailed(RuntimeError):
    """The server could not start; the message says why and what to change."""


# An installed Triton (bin/tritonserver, backends/), e.g. /opt/tritonserver in NVIDIA's container;
# without it the build inside the nvidia-pytriton wheel is used.
TRITON_ROOT_ENV = "FLUX_TRITONSERVER_ROOT"


def pytriton_root() -> Path:
    """Folder of the Triton build (bin/, backends/): $FLUX_TRITONSERVER_ROOT, else the
    nvidia-pytriton wheel's."""
    import importlib.util

    if os.environ.get(TRITON_ROOT_ENV):
        return Path(os.environ[TRITON_ROOT_ENV])
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "tritonserver not found: install the nvidia-pytriton==0.7.0 wheel (`make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def prepare_backends() -> Path:
    """The wheel's backend directory, with the python backend stub for this Python version.

    The stub goes beside libtriton_python.so, at the same depth as in the wheel, so its relative
    RPATH still finds the wheel's bundled libraries.
    """
    root = pytriton_root()
    if os.environ.get(TRITON_ROOT_ENV):  # an installed Triton brings its stub in place
        return root / "backends"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"the nvidia-pytriton wheel has no python backend stub for Python {version}")
    target = root / "backends" / "python" / stub.name
    if not target.exists() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    return root / "backends"


def gpu_ids() -> list[int]:
    """Indices of the GPUs this process sees (from nvidia-smi; none when it is missing)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [i for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]


MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_CONTROL_FALLBACK = Path("/usr/local/nvidia/bin") / MPS_CONTROL


class MpsDaemon:
    """The CUDA MPS control daemon, private to one server (its own pipe and log folders).

    Every Triton Python model instance is a process with its own CUDA context; without MPS the GPU
    time-slices between them, and a model's small kernels stall the DiT's (docs/performance.md).
    With it, all the server's processes share the GPU as one client.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log")}
        self.running = False

    @staticmethod
    def control() -> str | None:
        """The control program's path, or None when this machine has none."""
        found = shutil.which(MPS_CONTROL)
        return found or (str(MPS_CONTROL_FALLBACK) if MPS_CONTROL_FALLBACK.exists() else None)

    def start(self) -> None:
        for folder in self.env.values():
            Path(folder).mkdir(parents=True, exist_ok=True)
        subprocess.run([self.control(), "-d"], env={**os.environ, **self.env}, check=True, timeout=30)
        self.running = True

    def stop(self) -> None:
        if self.running:
            subprocess.run([self.control()], input=b"quit\n", env={**os.environ, **self.env},
                           check=False, timeout=60)
            self.running = False


def jemalloc_path() -> str | None:
    """jemalloc's shared library where installed (see JEMALLOC_PATHS), else None."""
    return next((path for path in JEMALLOC_PATHS if Path(path).exists()), None)


def probe_request(config: dict) -> dict:
    """The HTTP inference body of a probe (`specs.PROBE_INPUT`) for a model of this `config`
    (Triton's JSON model config): every required input at its smallest shape (variable dims 1),
    zeros or empty strings, and `probe`."""
    inputs = []
    for tensor in config.get("input", []):
        if tensor.get("optional") and tensor["name"] != PROBE_INPUT.name:
            continue
        dtype = tensor["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
        shape = [1 if dim < 0 else dim for dim in tensor["dims"]]
        count = math.prod(shape)
        value = True if tensor["name"] == PROBE_INPUT.name else "" if dtype == "BYTES" else \
            False if dtype == "BOOL" else 0
        inputs.append({"name": tensor["name"], "shape": shape, "datatype": dtype,
                       "data": [value] * count})
    return {"inputs": inputs}


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (a TIME_WAIT socket does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(launcher: int) -> None:
    """In the forked child: SIGTERM (Triton's graceful shutdown) once the launcher dies, however
    it dies, so no server outlives it; and no start at all if it died before the signal was armed."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:
        os._exit(1)


# The kernel sends the death signal when the *thread* that forked the child ends, so every server
# is forked from this one thread, which lives as long as the process; the supervisor's thread,
# which restarts servers, may end before them.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-triton-spawner")


@dataclass
class TritonServer:
    """One tritonserver process serving `repository` on `host` (loopback unless told otherwise).

    `device` "auto" runs in GPU mode when the repository places any model on a GPU: GPU metrics on
    and a CUDA memory pool large enough for 1024² tensors to pass between models without CUDA IPC.
    `model_dir`, when given, overrides every config's model folder (FLUX_TRITON_MODEL_DIR).
    """

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    extra_args: list[str] = field(default_factory=list)
    log_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    device: str = "auto"
    model_dir: Path | None = None
    lora_dir: Path | None = None  # overrides the repository's LoRA folder (FLUX_TRITON_LORA_DIR)
    # override the repository's MAX_INFLIGHT / MAX_QUEUE (text as the variables take it)
    max_inflight: str | None = None
    max_queue: str | None = None
    mps: bool | None = None  # None: on for a GPU server where the MPS control program exists
    process: subprocess.Popen | None = None
    mps_daemon: MpsDaemon | None = None
    load_board: Path | None = None
    # the admin APIs' key (ADMIN_APIS): $FLUX_TRITON_ADMIN_KEY, else drawn here
    admin_key: str = field(default_factory=lambda: os.environ.get(ADMIN_KEY_ENV) or
                           secrets.token_urlsafe(32), repr=False)
    token: str = field(default_factory=lambda: secrets.token_hex(6))  # names what this server leaves
    removed_regions: list[Path] = field(default_factory=list)  # what the last stop had to remove
    # model -> its probe: (path, JSON body)
    _probes: dict[str, tuple[str, bytes]] = field(default_factory=dict, repr=False)

    @property
    def uses_mps(self) -> bool:
        if self.mps is None:
            return self.on_gpu and MpsDaemon.control() is not None
        return self.mps

    @property
    def deployment(self) -> RepositoryConfig:
        """How the repository's models run (`make export` wrote it beside them)."""
        return RepositoryConfig.read(self.repository)

    @property
    def on_gpu(self) -> bool:
        if self.device == "auto":
            return self.deployment.uses_gpu
        return self.device == "gpu"

    @property
    def local_host(self) -> str:
        """Where this machine reaches the server (loopback when it listens on every address)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def command(self) -> list[str]:
        if self.on_gpu:  # a pool on every GPU, listed in the repository or not
            gpus = sorted(set(gpu_ids()) | self.deployment.gpus)
            pools = [f"--cuda-memory-pool-byte-size={gpu}:{CUDA_POOL_BYTES}" for gpu in gpus]
            device_args = ["--allow-gpu-metrics=true", *pools]
        else:
            device_args = ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={prepare_backends()}",
            "--disable-auto-complete-config",
            *device_args,
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=20",
            f"--http-restricted-api={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # Every rendered model loaded at start (no stray folder), and the supervisor may unload
            # and load one again.
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in self.deployment.names),
            *self.extra_args,
        ]

    @property
    def shm_prefix(self) -> str:
        return f"{SHM_PREFIX}{self.token}-"

    def shm_regions(self) -> list[Path]:
        """The python backend's shared-memory regions this server made (Triton removes them on a
        clean stop; a killed server leaves them)."""
        return sorted(SHM_FOLDER.glob(f"{self.shm_prefix}*"))

    def check_ports(self) -> None:
        """Refuse to start when a port is taken (Triton would load every model first, then die)."""
        for variable, port in (("HTTP_PORT", self.http_port), ("GRPC_PORT", self.grpc_port),
                               ("METRICS_PORT", self.metrics_port)):
            if port_in_use(self.host, port):
                raise StartFailed(
                    f"port {port} on {self.host} is in use ({variable}): stop what listens there, "
                    f"or choose another, e.g. `make serve {variable}={port + 100}` "
                    f"(--{variable.lower().replace('_', '-')} for the launcher)")

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}  # the server gets it as a flag
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        # Seven model processes share the cores: OpenMP threads must sleep, not spin, when idle.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        allocator = jemalloc_path() if env.get(MALLOC_ENV, "jemalloc") != "system" else None
        if allocator and allocator not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = " ".join(p for p in (allocator, env.get("LD_PRELOAD")) if p)
        if self.model_dir is not None:
            env[MODEL_DIR_ENV] = str(Path(self.model_dir).resolve())
        if self.lora_dir is not None:
            env[LORA_DIR_ENV] = str(Path(self.lora_dir).resolve())
        if self.max_inflight is not None:
            env[MAX_INFLIGHT_ENV] = self.max_inflight
        if self.max_queue is not None:
            env[MAX_QUEUE_ENV] = self.max_queue
        if self.mps_daemon is not None:
            env.update(self.mps_daemon.env)
        env.update(self.extra_env)
        return env

    def start_mps(self) -> None:
        """Start this server's MPS daemon if it uses one (before the server's processes start)."""
        if self.uses_mps and self.mps_daemon is None:
            self.mps_daemon = MpsDaemon(Path(tempfile.mkdtemp(prefix="flux-triton-mps-")))
            self.mps_daemon.start()

    def stop_mps(self) -> None:
        if self.mps_daemon is not None:
            self.mps_daemon.stop()
            self.mps_daemon = None

    def start(self, timeout_s: float = 120.0) -> float:
        """Start the server and wait until it is ready; return the start-to-ready seconds."""
        began = time.perf_counter()
        self.launch()
        self.wait_ready(timeout_s - (time.perf_counter() - began))
        return time.perf_counter() - began

    def launch(self) -> None:
        """Start the tritonserver process (after checking its ports), without waiting for it."""
        self.check_ports()
        self.start_mps()
        command, env = self.command(), self.environment()
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:  # the child has its own copy of the log's descriptor
            self.process = _spawner.submit(
                subprocess.Popen, command, env=env, stdout=out or None, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=partial(_die_with_parent, os.getpid()),
            ).result()
        finally:
            if out is not None:
                out.close()
        # the folder where this server's flux_bls instances share their load (see stop)
        self.load_board = board_folder(self.process.pid)

    def wait_ready(self, timeout_s: float, cancelled: threading.Event | None = None) -> None:
        """Wait until the launched server is ready; a server that exits or stays unready past
        `timeout_s` is stopped, and what it created removed. Returns early, the server not
        ready, once `cancelled` is set (its owner stops it)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if cancelled is not None and cancelled.is_set():
                return
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()  # removes what the failed start left
                raise StartFailed(f"tritonserver exited with code {code}"
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            if self.is_ready():
                return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s")

    def model_control(self, model: str, action: str, timeout_s: float = 600.0) -> None:
        """Load or unload one model through Triton's repository API (explicit model control)."""
        self.admin_request(f"/v2/repository/models/{model}/{action}", timeout_s)

    def admin_request(self, path: str, timeout_s: float = 30.0) -> bytes:
        """POST `{}` to one of Triton's restricted HTTP APIs with the admin key; the answer's body."""
        url = f"http://{self.local_host}:{self.http_port}{path}"
        request = urllib.request.Request(url, data=b"{}", method="POST", headers={
            "Content-Type": "application/json", ADMIN_HEADER: self.admin_key})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: HTTP {exc.code}: {exc.read().decode()[:300]}") from exc

    def probe(self, model: str, timeout_s: float) -> None:
        """Ask `model` something its own execute answers at once: a `probe` request (its other
        inputs the smallest its config allows, zeros), or for the decoupled flux_bls the list of
        its adapters. Returns once answered, an error answer included; raises OSError when no
        answer came in `timeout_s` (or the server did not take the request)."""
        if model not in self._probes:  # made once: the repository and configs do not change
            if self.deployment.python_models()[model].decoupled:
                path, body = f"/v2/models/{model}/generate", {"list_loras": True}
            else:
                path = f"/v2/models/{model}/infer"
                body = probe_request(json.loads(self.get(f"/v2/models/{model}/config")))
            self._probes[model] = (path, json.dumps(body).encode())
        path, data = self._probes[model]
        url = f"http://{self.local_host}:{self.http_port}{path}"
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:  # an answer, if an error one: the model is alive
            exc.read()

    def get(self, path: str, timeout_s: float = 5.0) -> bytes:
        with urllib.request.urlopen(f"http://{self.local_host}:{self.http_port}{path}",
                                    timeout=timeout_s) as response:
            return response.read()

    def model_states(self) -> dict[str, str]:
        """Every model's state in Triton's repository index (READY, LOADING, UNLOADING, ...)."""
        index = json.loads(self.admin_request("/v2/repository/index", timeout_s=5) or b"[]")
        return {entry["name"]: entry.get("state", "") for entry in index}

    def is_ready(self) -> bool:
        """Ready over HTTP, and its metrics endpoint listening: Triton opens that one last, tens
        of milliseconds after the health check may already pass."""
        try:
            url = f"http://{self.local_host}:{self.http_port}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status != 200:
                    return False
            socket.create_connection((self.local_host, self.metrics_port), timeout=1).close()
            return True
        except OSError:
            return False

    def metrics(self) -> str:
        """The Prometheus text of Triton's /metrics endpoint."""
        url = f"http://{self.local_host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (Triton's graceful shutdown), then SIGKILL of the whole group if it hangs; then
        the MPS daemon, if any."""
        try:
            if self.process is None or self.process.poll() is not None:
                return None if self.process is None else self.process.returncode
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                return self.process.wait()
        finally:
            self.stop_mps()
            if self.load_board is not None:  # instances that were killed never removed their files
                shutil.rmtree(self.load_board, ignore_errors=True)
            self.removed_regions = self.shm_regions()  # a killed or failed server leaves them
            for region in self.removed_regions:
                region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """`make serve`: run tritonserver in the foreground, supervised."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="gpu: GPU metrics and CUDA memory pools; auto: as the repository says")
    parser.add_argument("--model-dir", help="serve this model folder instead of the configs' model_dir")
    parser.add_argument("--lora-dir", help="serve the LoRA adapters of this folder instead")
    parser.add_argument("--max-inflight", help="MAX_INFLIGHT: generations one flux_bls instance "
                        "(one GPU) runs at once, instead of the repository's")
    parser.add_argument("--max-queue", help="MAX_QUEUE: requests that may wait on the whole server "
                        "(none: no bound), instead of the repository's")
    parser.add_argument("--mps", choices=["auto", "on", "off"], default="auto",
                        help="CUDA MPS for the server's processes (auto: on for a GPU repository)")
    parser.add_argument("--supervisor-port", type=int, default=None,
                        help="serve the supervisor's Prometheus metrics on this port")
    parser.add_argument("--not-ready-bound", type=float, default=Supervisor.not_ready_bound_s,
                        help="seconds a model may stay not READY before it is recovered")
    parser.add_argument("--probe-interval", type=float, default=Supervisor.probe_interval_s,
                        help="seconds between probes of each model (0: no probes)")
    parser.add_argument("--probe-timeout", type=float, default=Supervisor.probe_timeout_s,
                        help="seconds a model may leave a probe unanswered before it is "
                             "recovered as stuck (longer than its longest call)")
    parser.add_argument("--ready-timeout", type=float, default=1800.0,
                        help="seconds to wait for readiness (a first GPU start compiles)")
    parser.add_argument("extra", nargs="*", help="more tritonserver flags (after --)")
    args = parser.parse_args(argv)
    try:
        RepositoryConfig.read(args.repository)
        for name, value in (("MAX_INFLIGHT", args.max_inflight), ("MAX_QUEUE", args.max_queue)):
            if value is not None:
                parse_queue_limit(name, value)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    server = TritonServer(Path(args.repository), args.http_port, args.grpc_port, args.metrics_port,
                          extra_args=args.extra, host=args.host, device=args.device,
                          model_dir=Path(args.model_dir) if args.model_dir else None,
                          lora_dir=Path(args.lora_dir) if args.lora_dir else None,
                          max_inflight=args.max_inflight, max_queue=args.max_queue,
                          mps={"auto": None, "on": True, "off": False}[args.mps])
    supervisor = Supervisor(server, not_ready_bound_s=args.not_ready_bound,
                            metrics_port=args.supervisor_port, probe_interval_s=args.probe_interval,
                            probe_timeout_s=args.probe_timeout)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stopping.append("SIGINT"))
    try:
        supervisor.start(timeout_s=args.ready_timeout)
    except (StartFailed, TimeoutError) as exc:
        raise SystemExit(f"tritonserver did not start: {exc}") from None
    print(f"tritonserver ready: HTTP {server.local_host}:{server.http_port}, gRPC :{server.grpc_port},"
          f" metrics :{server.metrics_port}" + (f", supervisor metrics :{args.supervisor_port}"
                                                if args.supervisor_port else ""), flush=True)
    if server.deployment.random_weights:
        print("WARNING: this repository serves RANDOM weights (exported with RANDOM_WEIGHTS=1): its "
              "images mean nothing", flush=True)
    try:  # in the foreground until Ctrl-C or SIGTERM, or until the supervisor gives up
        while not stopping and not supervisor.failed:
            time.sleep(0.5)
    finally:
        code = supervisor.stop()
    sys.exit(1 if supervisor.failed else (code or 0))


if __name__ == "__main__":
    main()
