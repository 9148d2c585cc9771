"""Attacks on a served deployment, as `make serve` and the Kubernetes manifests run it (real
tritonserver, tiny model, CPU): Triton's admin APIs refuse every client but the supervisor, a
stream that loses its server ends with an `error` event, and no server outlives its launcher."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from devtools.processes import free_port
from flux_triton.adapters.faults import FAULTS_ENV
from flux_triton.export.repository import write_repository
from flux_triton.server.launcher import ADMIN_HEADER, SHM_FOLDER, TritonServer
from flux_triton.server.supervisor import model_processes
from flux_triton.serving_config import RepositoryConfig
from tests.gateway_server import RunningGateway, sse_events
from tests.reference import REPO_ROOT

READY_BOUND_S = 120
DEPLOY = REPO_ROOT / "deploy"


def _http(port: int, path: str, body: bytes | None = None, headers: dict | None = None
          ) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _wait_ready(port: int, bound_s: float = READY_BOUND_S) -> None:
    deadline = time.monotonic() + bound_s
    while _http(port, "/v2/health/ready")[0] != 200:
        assert time.monotonic() < deadline, f"no ready server on :{port} within {bound_s} s"
        time.sleep(0.2)


def _tritonservers(repository: Path) -> list[int]:
    """Pids of the tritonserver processes serving `repository`."""
    wanted = f"--model-repository={repository.resolve()}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"tritonserver") and wanted in argv:
            found.append(int(entry.name))
    return found


def _argument(pid: int, prefix: str) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return next(a[len(prefix):] for a in argv if a.startswith(prefix))


class Deployment:
    """A launcher process (its own process group, as a terminal runs it) and its ports."""

    def __init__(self, command: list[str], repository: Path, ports: list[int], env: dict):
        self.repository, self.ports = repository, ports
        self.http, self.grpc, self.metrics = ports
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env},
                                        start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _wait_ready(self.http)
        self.first_server = self.server()

    def server(self) -> int:
        """The pid of the tritonserver serving now."""
        servers = _tritonservers(self.repository)
        assert len(servers) == 1, servers
        return servers[0]

    def kill_model(self, model: str) -> None:
        os.kill(next(p.pid for p in model_processes(self.server(), self.repository)
                     if p.model == model), signal.SIGKILL)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in _tritonservers(self.repository):  # never leave one behind, whatever failed
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def make_serve(model_dirs, tmp_path_factory):
    """`make serve` as a user runs it, on the tiny schnell model's repository."""
    root = tmp_path_factory.mktemp("make-serve")
    repository = write_repository(model_dirs["schnell"], root / "repository")
    ports = [free_port() for _ in range(3)]
    command = ["make", "-s", "serve", f"REPOSITORY={repository}", f"HTTP_PORT={ports[0]}",
               f"GRPC_PORT={ports[1]}", f"METRICS_PORT={ports[2]}"]
    faults = root / "faults"  # test-only slowdowns (flux_triton.adapters.faults), none planned
    faults.mkdir()
    deployment = Deployment(command, repository, ports, {FAULTS_ENV: str(faults)})
    deployment.faults = faults
    yield deployment
    deployment.stop()


def _kubernetes_command(repository: Path, model_dir: Path, cache: Path, ports: list[int]
                        ) -> tuple[list[str], dict]:
    """The Triton pod's command as deploy/ declares it (the image's ENTRYPOINT, the Deployment's
    args and env), run here: the repository, model folder and cache at local paths, loopback, and
    free ports in place of 8000-8002."""
    entrypoint = next(json.loads(line.split(None, 1)[1]) for line in
                      (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "triton-deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = [sys.executable if part == "python" else part for part in entrypoint + container["args"]]
    local = {"/models/model_repository": str(repository), "0.0.0.0": "127.0.0.1",
             "8003": str(free_port())}
    command = [local.get(part, part) for part in command]
    command += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                "--metrics-port", str(ports[2])]
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(FLUX_TRITON_MODEL_DIR=str(model_dir), FLUX_TRITON_COMPILE_CACHE=str(cache))
    return command, env


def _model_py_load(name: str, marker: Path) -> bytes:
    """A load request that carries its own model.py (Triton's file override): the code writes
    `marker` if it ever runs."""
    code = (f"import os\nopen({str(marker)!r}, 'w').write(str(os.getuid()))\n"
            "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n")
    config = {"name": name, "backend": "python", "max_batch_size": 0,
              "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]}
    return json.dumps({"parameters": {"config": json.dumps(config),
                                      "file:1/model.py": base64.b64encode(code.encode()).decode()}
                       }).encode()


def _attack(deployment: Deployment, marker: Path) -> dict[str, str]:
    """Every admin call a client might try, without the key; what each got."""
    port = deployment.http
    outcomes = {}
    for label, path, body in (
        ("unload flux_bls", "/v2/repository/models/flux_bls/unload", b"{}"),
        ("load with model.py", "/v2/repository/models/intruder/load", _model_py_load("intruder", marker)),
        ("repository index", "/v2/repository/index", b"{}"),
        ("log level", "/v2/logging", b'{"log_verbose_level": 1}'),
        ("trace file", "/v2/trace/setting", json.dumps({"trace_file": str(marker)}).encode()),
        ("register shared memory", "/v2/systemsharedmemory/region/r/register",
         b'{"key": "/triton_python_backend_shm_region_x", "offset": 0, "byte_size": 64}'),
    ):
        status, text = _http(port, path, body)
        outcomes[f"HTTP {label}"] = f"{status} {text[:90]}"
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{deployment.grpc}")
    for label, call in (("unload flux_bls", lambda: client.unload_model("flux_bls")),
                        ("load", lambda: client.load_model("intruder")),
                        ("log settings", lambda: client.update_log_settings({"log_info": False}))):
        try:
            call()
            outcomes[f"gRPC {label}"] = "accepted"
        except InferenceServerException as exc:
            outcomes[f"gRPC {label}"] = exc.message()[:90]
    client.close()
    return outcomes


def _assert_refused(deployment: Deployment, marker: Path) -> None:
    outcomes = _attack(deployment, marker)
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in outcomes.items()))
    for label, outcome in outcomes.items():
        if label.startswith("HTTP"):
            assert outcome.startswith("403 ") and ADMIN_HEADER in outcome, (label, outcome)
        else:
            assert "restricted" in outcome and ADMIN_HEADER in outcome, (label, outcome)
    assert not marker.exists(), "the uploaded model.py ran"
    assert _http(deployment.http, "/v2/models/flux_bls/ready")[0] == 200  # nothing was unloaded
    assert _http(deployment.http, "/v2/models/intruder/ready")[0] != 200


def test_make_serve_refuses_the_admin_api(make_serve, tmp_path):
    _assert_refused(make_serve, tmp_path / "pwned")


def test_kubernetes_pod_refuses_the_admin_api(model_dirs, tmp_path):
    repository = write_repository(model_dirs["schnell"], tmp_path / "repository")
    ports = [free_port() for _ in range(3)]
    command, env = _kubernetes_command(repository, model_dirs["schnell"], tmp_path / "cache", ports)
    print(f"\npod command: {shlex.join(command)}")
    deployment = Deployment(command, repository, ports, env)
    try:
        _assert_refused(deployment, tmp_path / "pwned")
    finally:
        deployment.stop()


def test_stream_that_loses_the_server_ends_with_an_error_event(make_serve):
    """The supervisor restarts the whole server when flux_bls dies: an SSE client mid-stream gets
    an `error` event in OpenAI's shape, never a silent end."""
    # each DiT call 50 ms longer: the stream is still running when the kill lands, however busy
    # the machine (a loaded CI runner once let the tiny model's 100 steps finish first)
    plan = make_serve.faults / "dit_transformer.json"
    plan.write_text(json.dumps({"delay_ms": 50}))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(plan.unlink)
        gateway = cleanup.enter_context(RunningGateway(_gateway_settings(make_serve)))
        connection = gateway.connection()
        connection.request("POST", "/v1/images/generations", headers={
            "Content-Type": "application/json"}, body=json.dumps(
            {"prompt": "a lighthouse", "size": "64x64", "steps": 100, "stream": True,
             "preview": "x0"}))
        response = connection.getresponse()
        assert response.status == 200
        events = []
        for name, data, _ in sse_events(response):
            events.append((name, data))
            if len(events) == 2:  # mid-stream: kill the process that holds it
                make_serve.kill_model("flux_bls")
        connection.close()
    names = [name for name, _ in events]
    print(f"\nevents: {names[:3]} ... {names[-1]}: {events[-1][1]}")
    assert names[-1] == "error" and "image_generation.completed" not in names
    error = events[-1][1]["error"]
    assert error["type"] == "server_error" and error["message"]
    _wait_ready(make_serve.http)


def _gateway_settings(deployment: Deployment):
    from flux_triton.gateway.app import GatewaySettings

    return GatewaySettings(triton_url=f"127.0.0.1:{deployment.grpc}")


def test_no_server_outlives_make_serve(make_serve):
    """After the supervisor restarted the server, the launcher's whole process group is killed
    with SIGKILL (no chance to clean up, as the OOM killer or `kill -9` does): the restarted
    server and its model processes are gone, the ports free, and no shared memory is left."""
    _wait_ready(make_serve.http)
    if make_serve.server() == make_serve.first_server:  # not restarted yet: make it so
        make_serve.kill_model("flux_bls")
        deadline = time.monotonic() + READY_BOUND_S
        while not (_tritonservers(make_serve.repository) != [make_serve.first_server]
                   and _http(make_serve.http, "/v2/health/ready")[0] == 200):
            assert time.monotonic() < deadline, "the supervisor did not restart the server"
            time.sleep(0.2)
    servers = [make_serve.server()]
    assert servers[0] != make_serve.first_server
    prefix = _argument(servers[0], "--backend-config=python,shm-region-prefix-name=")
    assert list(SHM_FOLDER.glob(f"{prefix}*"))
    stubs = [p.pid for p in model_processes(servers[0], make_serve.repository)]
    os.killpg(make_serve.process.pid, signal.SIGKILL)
    make_serve.process.wait()
    began = time.monotonic()
    alive = lambda: [pid for pid in [*servers, *stubs] if Path(f"/proc/{pid}").exists()  # noqa: E731
                     and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    while alive() and time.monotonic() - began < 40:
        time.sleep(0.2)
    print(f"\nserver and {len(stubs)} model processes gone {time.monotonic() - began:.1f} s after "
          f"the launcher's SIGKILL; left: {alive()}")
    assert not alive(), "the server outlived its launcher"
    for port in make_serve.ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # raises if still held
    assert not list(SHM_FOLDER.glob(f"{prefix}*")), "shared memory left in /dev/shm"


def test_busy_port_is_refused_before_any_model_loads(model_dirs, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        repository = write_repository(model_dirs["schnell"], tmp_path / "repository")
        before = set(SHM_FOLDER.iterdir())
        began = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "flux_triton.server.launcher", "--repository", str(repository),
             "--http-port", str(taken), "--grpc-port", str(free_port()),
             "--metrics-port", str(free_port())], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=60)
    took = time.monotonic() - began
    print(f"\nexit {run.returncode} after {took:.1f} s: {run.stderr.strip()}")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert f"port {taken}" in run.stderr and "HTTP_PORT" in run.stderr
    assert took < 15 and set(SHM_FOLDER.iterdir()) <= before


def test_failed_start_leaves_nothing_behind(model_dirs, tmp_path, monkeypatch):
    """A server that dies while starting (here: its HTTP port taken after the launcher's check)
    leaves no shared memory and no load board."""
    import flux_triton.server.launcher as launcher

    full = write_repository(model_dirs["schnell"], tmp_path / "full")
    repository = tmp_path / "repository"
    repository.mkdir()
    os.symlink(full / "tokenizer", repository / "tokenizer")  # one quick model is enough
    RepositoryConfig(tuple(m for m in RepositoryConfig.read(full).models
                           if m.name == "tokenizer")).write(repository)
    monkeypatch.setattr(launcher, "port_in_use", lambda host, port: False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = TritonServer(repository, busy.getsockname()[1], free_port(), free_port(),
                              log_file=tmp_path / "log.txt")
        with pytest.raises(launcher.StartFailed, match="exited with code"):
            server.start(timeout_s=60)
    assert not server.shm_regions() and not server.load_board.exists()
    assert server.process.poll() is not None


@pytest.mark.fast
def test_spawned_servers_die_with_their_launcher(tmp_path):
    """The death signal is armed in the child, and from a thread that outlives the caller's."""
    import flux_triton.server.launcher as launcher

    script = tmp_path / "child.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').write('term'),"
                      " sys.exit(0)))\n"
                      "open(sys.argv[1] + '.up', 'w').close()\ntime.sleep(60)\n")
    marker = tmp_path / "got"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import functools, os, subprocess, sys, threading, time\n"
        "import flux_triton.server.launcher as l\n"
        "def spawn():\n"
        f"    l._spawner.submit(subprocess.Popen, [sys.executable, {str(script)!r}, {str(marker)!r}],"
        " start_new_session=True,"
        " preexec_fn=functools.partial(l._die_with_parent, os.getpid())).result()\n"
        "t = threading.Thread(target=spawn); t.start(); t.join()\n"  # the caller's thread ends
        "time.sleep(60)\n")], cwd=REPO_ROOT)
    deadline = time.monotonic() + 30
    while not Path(f"{marker}.up").exists():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    assert not marker.exists()  # alive while the launcher lives, though the caller's thread ended
    parent.kill()
    parent.wait()
    while not marker.exists():
        assert time.monotonic() < deadline, "the child outlived its launcher"
        time.sleep(0.05)
    assert launcher.PR_SET_PDEATHSIG == 1
