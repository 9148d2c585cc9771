"""A server that heals (real tritonserver, tiny model, CPU): kill -9 each model process, idle and
mid-stream, and a stub that hangs (SIGSTOP). In-flight streams end, readiness goes false and comes
back, and the same request afterwards gives the same image."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from devtools.processes import free_port
from flux_triton.export.repository import write_repository
from flux_triton.server.launcher import TritonServer
from flux_triton.server.supervisor import Supervisor, model_processes
from flux_triton.serving_config import ModelDeployment, RepositoryConfig
from tests.reference import served_generate

MODELS = ("tokenizer", "clip_encoder", "t5_encoder", "dit_transformer", "vae_decoder", "flux_bls")
REQUEST = dict(prompt="a lighthouse on a cliff", height=64, width=64, num_inference_steps=4, seed=5)
SLOW = dict(REQUEST, num_inference_steps=8)  # with the DiT slowed: a few seconds in flight
RECOVERY_BOUND_S = 30  # the target on CPU with the tiny model
STREAM_END_BOUND_S = 30
NOT_READY_BOUND_S = 5  # a model not READY this long is recovered (the default is 60 s)
PROBE_INTERVAL_S, PROBE_TIMEOUT_S = 1, 10  # the defaults are 5 s and 120 s


class Healing:
    def __init__(self, supervisor: Supervisor, fault_dir):
        self.supervisor = supervisor
        self.server = supervisor.server
        self.fault_dir = fault_dir
        self.url = f"127.0.0.1:{self.server.grpc_port}"

    def client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)

    def pid(self, model: str) -> int:
        stubs = [p.pid for p in model_processes(self.server.process.pid, self.server.repository)
                 if p.model == model]
        assert stubs, f"no process of {model}"
        return stubs[0]

    def status(self, path: str) -> int:
        url = f"http://127.0.0.1:{self.server.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0  # not answering (a whole-server restart)


class ReadinessTimeline:
    """Samples server and model readiness every 50 ms from a thread."""

    def __init__(self, healing: Healing, model: str):
        self.healing, self.model = healing, model
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.began = time.monotonic()
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - self.began,
                                 self.healing.status("/v2/health/ready"),
                                 self.healing.status(f"/v2/models/{self.model}/ready")))
            time.sleep(0.05)

    def wait_ready_again(self, bound_s: float) -> float:
        """Seconds from the start until ready again after having been not ready."""
        deadline = self.began + bound_s
        while time.monotonic() < deadline:
            went_down = any(s[1] != 200 for s in self.samples)
            if went_down and self.samples[-1][1] == 200 and self.samples[-1][2] == 200:
                self.stop.set()
                return self.samples[-1][0]
            time.sleep(0.05)
        self.stop.set()
        raise AssertionError(f"not ready again within {bound_s} s: {self.summary()}")

    def summary(self) -> list[tuple[float, int, int]]:
        """The samples where readiness changed."""
        changes, last = [], None
        for t, server, model in self.samples:
            if (server, model) != last:
                changes.append((round(t, 2), server, model))
                last = (server, model)
        return changes


@pytest.fixture(scope="module")
def healing(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("healing")
    fault_dir = root / "faults"
    fault_dir.mkdir()
    repository = write_repository(model_dirs["schnell"], root / "repository")
    ports = [free_port() for _ in range(3)]
    server = TritonServer(repository, *ports, log_file=root / "tritonserver.log",
                          extra_env={"FLUX_TRITON_FAULT_DIR": str(fault_dir)})
    supervisor = Supervisor(server, not_ready_bound_s=NOT_READY_BOUND_S, metrics_port=free_port(),
                            probe_interval_s=PROBE_INTERVAL_S, probe_timeout_s=PROBE_TIMEOUT_S)
    supervisor.start()
    yield Healing(supervisor, fault_dir)
    supervisor.stop(timeout_s=10)


@pytest.fixture(scope="module")
def reference(healing):
    result = served_generate(healing, REQUEST, timeout_s=60)
    assert result.error is None, result.error
    return result.image


def _kill_and_recover(healing: Healing, model: str, sig=signal.SIGKILL) -> tuple[float, list]:
    timeline = ReadinessTimeline(healing, model)
    os.kill(healing.pid(model), sig)
    recovered_s = timeline.wait_ready_again(RECOVERY_BOUND_S)
    return recovered_s, timeline.summary()


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the supervisor did not record the recovery"
        time.sleep(0.05)


def _after_recovery_same_image(healing: Healing, reference: np.ndarray) -> None:
    result = served_generate(healing, REQUEST, timeout_s=60)
    assert result.error is None, result.error
    assert np.array_equal(result.image, reference)


@pytest.mark.parametrize("model", MODELS)
def test_killed_while_idle_comes_back(healing, reference, model):
    restarts = healing.supervisor.restarts[model]
    recovered_s, timeline = _kill_and_recover(healing, model)
    print(f"\n{model} killed while idle: ready again after {recovered_s:.1f} s; "
          f"readiness (s, server, model): {timeline}")
    _wait_for(lambda: healing.supervisor.restarts[model] == restarts + 1, 10)
    _after_recovery_same_image(healing, reference)


@pytest.mark.parametrize("model", MODELS)
def test_killed_mid_stream_ends_streams_and_comes_back(healing, reference, model):
    (healing.fault_dir / "dit_transformer.json").write_text(json.dumps({"delay_ms": 400}))
    results, started = {}, threading.Event()

    def stream(i: int) -> None:
        def on_step(step):
            started.set()
        client = healing.client()
        from flux_triton.clients.stream_client import build_inputs, stream_generate

        result = stream_generate(client, build_inputs(**dict(SLOW, seed=i)), on_step=on_step,
                                 timeout_s=STREAM_END_BOUND_S + 30)
        results[i] = (time.monotonic(), result)
        client.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        assert started.wait(30), "no stream got a first step"
        killed_at = time.monotonic()
        recovered_s, timeline = _kill_and_recover(healing, model)
    finally:
        (healing.fault_dir / "dit_transformer.json").unlink()
    for thread in threads:
        thread.join(STREAM_END_BOUND_S + 40)
    assert len(results) == 3, "a stream hung"
    outcomes = []
    for ended, result in results.values():
        assert ended - killed_at < STREAM_END_BOUND_S, f"a stream ended {ended - killed_at:.1f} s late"
        if result.error is None:  # it had passed the killed model, or came after its recovery
            assert result.kinds[-2:] == ["image", "final"], result.kinds
            outcomes.append(f"completed after {ended - killed_at:.1f} s")
        elif model == "flux_bls":  # its process held the stream: the server restart closed it
            assert "error" in result.kinds[-1:]
            outcomes.append(f"{ended - killed_at:.1f} s: {result.error[:90]}")
        else:  # flux_bls ended it with the component named and a hint
            assert result.kinds[-1] == "error"
            assert model in result.error and "retry in a few seconds" in result.error, result.error
            outcomes.append(f"{ended - killed_at:.1f} s: {result.error[:90]}")
    print(f"\n{model} killed mid-stream: ready again after {recovered_s:.1f} s; "
          f"readiness (s, server, model): {timeline}; streams: {outcomes}")
    _after_recovery_same_image(healing, reference)


def test_stopped_process_is_treated_as_dead(healing, reference):
    recovered_s, timeline = _kill_and_recover(healing, "dit_transformer", signal.SIGSTOP)
    print(f"\ndit_transformer stopped (SIGSTOP): killed and ready again after {recovered_s:.1f} s; "
          f"readiness (s, server, model): {timeline}")
    _after_recovery_same_image(healing, reference)


def test_model_stuck_unloading_is_recovered(healing, reference):
    """flux_bls unloaded with a stream in flight stays UNLOADING, its process alive, for as long
    as the stream runs (readiness fails, every generation is refused): the supervisor restarts
    the server once the bound has passed."""
    (healing.fault_dir / "dit_transformer.json").write_text(json.dumps({"delay_ms": 120_000}))
    results = {}

    def stream() -> None:
        results["stream"] = served_generate(healing, REQUEST, timeout_s=120)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        time.sleep(2)  # the request waits in its first DiT call
        timeline = ReadinessTimeline(healing, "flux_bls")
        healing.server.model_control("flux_bls", "unload")  # as an operator with the key could
        assert healing.server.model_states()["flux_bls"] == "UNLOADING"
        assert any(p.model == "flux_bls" for p in model_processes(healing.server.process.pid,
                                                                  healing.server.repository))
    finally:
        (healing.fault_dir / "dit_transformer.json").unlink()
    recovered_s = timeline.wait_ready_again(NOT_READY_BOUND_S + RECOVERY_BOUND_S)
    thread.join(60)
    detected = [e for e in healing.supervisor.events if e["event"] == "detected"][-1]
    print(f"\nflux_bls stuck UNLOADING: {detected['seen']}, ready again after {recovered_s:.1f} s; "
          f"readiness (s, server, model): {timeline.summary()}; stream: {results['stream'].error}")
    assert detected["model"] == "flux_bls" and detected["seen"].startswith("UNLOADING")
    assert recovered_s > NOT_READY_BOUND_S and results["stream"].error is not None
    _after_recovery_same_image(healing, reference)


def test_a_hung_component_is_found_by_its_probe_and_healed(healing, reference):
    """The T5 encoder hangs in its execute (the process lives, asleep in state S, which no
    process check sees): its probe goes unanswered, the supervisor kills and reloads it, and the
    stream waiting on it ends instead of hanging."""
    (healing.fault_dir / "t5_encoder.json").write_text(json.dumps({"hang_next": 1}))
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault(
        "stream", served_generate(healing, REQUEST, timeout_s=120)))
    thread.start()
    timeline = ReadinessTimeline(healing, "t5_encoder")
    hung = healing.pid("t5_encoder")
    time.sleep(1)
    states = {p.pid: p.state for p in model_processes(healing.server.process.pid,
                                                      healing.server.repository)}
    assert states.get(hung) == "S", states
    recovered_s = timeline.wait_ready_again(PROBE_TIMEOUT_S + RECOVERY_BOUND_S)
    thread.join(60)
    (healing.fault_dir / "t5_encoder.json").unlink()
    detected = [e for e in healing.supervisor.events if e["event"] == "detected"][-1]
    stream = results["stream"]
    print(f"\nt5_encoder hung: {detected['seen']}; ready again after {recovered_s:.1f} s; "
          f"readiness (s, server, model): {timeline.summary()}; stream: {stream.error or 'image'}")
    assert detected["model"] == "t5_encoder" and "probe" in detected["seen"]
    assert healing.supervisor.probes_unanswered >= 1 and hung != healing.pid("t5_encoder")
    assert stream.error is None or "t5_encoder" in stream.error, stream.error
    _after_recovery_same_image(healing, reference)


def test_recovery_is_counted_and_timed(healing):
    supervisor = healing.supervisor
    assert supervisor.restarts["dit_transformer"] >= 2 and supervisor.restarts["flux_bls"] >= 2
    assert supervisor.server_restarts >= 2 and supervisor.not_ready_s > 0 and not supervisor.failed
    url = f"http://127.0.0.1:{healing.supervisor.metrics_port}/metrics"
    deadline = time.monotonic() + 60
    while True:  # a recovery may still be completing: the two agree once none is mid-update
        not_ready_before = supervisor.not_ready_s
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("flux_")}
        settled = supervisor.not_ready_s == not_ready_before
        if settled and values["flux_not_ready_seconds_total"] == pytest.approx(not_ready_before):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert values['flux_component_restarts_total{model="dit_transformer"}'] >= 2
    assert values["flux_server_restarts_total"] >= 2
    assert values["flux_not_ready_seconds_total"] == pytest.approx(not_ready_before)
    assert values["flux_supervisor_failed"] == 0


@pytest.mark.fast
def test_supervisor_finds_models_not_ready_past_the_bound(tmp_path):
    RepositoryConfig((ModelDeployment("flux_bls", "python", decoupled=True),)).write(tmp_path)

    class Index:
        repository, process = tmp_path, None
        # "stray": a folder in the repository the server never loaded (no state): not ours
        states = {"flux_bls": "READY", "vae_decoder": "READY", "stray": ""}

        def model_states(self):
            return dict(self.states)

    server = Index()
    supervisor = Supervisor(server, not_ready_bound_s=0.3)
    assert supervisor.stuck_models() == {}
    server.states["flux_bls"] = "UNLOADING"
    assert supervisor.stuck_models() == {}  # not yet past the bound
    time.sleep(0.4)
    assert list(supervisor.stuck_models()) == ["flux_bls"]  # never the stray folder
    assert supervisor.stuck_models()["flux_bls"].startswith("UNLOADING for")
    server.states["flux_bls"] = "READY"
    assert supervisor.stuck_models() == {}
    server.states["flux_bls"] = "UNAVAILABLE"  # the clock starts again
    assert supervisor.stuck_models() == {}


@pytest.mark.fast
def test_supervisor_gives_up_past_the_liveness_bound(tmp_path):
    """Recovery that keeps failing stops the server (so liveness fails), and says so."""
    RepositoryConfig((ModelDeployment("dit_transformer", "python"),)).write(tmp_path)

    class BrokenServer:
        repository, process, stopped = tmp_path, None, False

        def model_control(self, model, action):
            raise RuntimeError("load failed: CUDA error: an illegal memory access")

        def stop(self, timeout_s=30.0):
            self.stopped = True

    server = BrokenServer()
    supervisor = Supervisor(server, liveness_bound_s=0.5)
    began = time.monotonic()
    supervisor.recover("dit_transformer", "process 1 is dead")
    assert supervisor.failed and server.stopped
    assert time.monotonic() - began < 10
    assert [e["event"] for e in supervisor.events][-1] == "giving_up"


@pytest.mark.fast
def test_stop_during_a_restart_neither_fails_nor_restarts(tmp_path):
    """`stop()` while the supervisor restarts the server: the restart gives up waiting, nothing
    is launched after the stop, no failure or recovery is recorded, and the server is stopped."""
    import threading as threading_module

    RepositoryConfig((ModelDeployment("flux_bls", "python", decoupled=True),)).write(tmp_path)
    launched = threading_module.Event()

    class SlowServer:
        repository, process = tmp_path, None
        launches, stops = 0, 0

        def launch(self):
            self.launches += 1
            launched.set()

        def wait_ready(self, timeout_s, cancelled=None):
            while not cancelled.is_set():  # a start that takes long
                time.sleep(0.01)

        def stop(self, timeout_s=30.0):
            self.stops += 1

        def is_ready(self):
            return False

    server = SlowServer()
    supervisor = Supervisor(server)
    supervisor._stop.clear()
    worker = threading_module.Thread(target=supervisor.recover, args=("flux_bls", "process gone"))
    worker.start()
    assert launched.wait(5)
    began = time.monotonic()
    supervisor.stop(timeout_s=5)
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - began < 2
    assert server.launches == 1 and not supervisor.failed
    assert [e["event"] for e in supervisor.events] == ["detected", "server_stopped"]
    assert server.stops == 2  # the restart's stop of the old server, then the supervisor's own


@pytest.mark.fast
def test_ready_waits_for_the_metrics_endpoint(tmp_path):
    """Triton opens its metrics port tens of ms after /v2/health/ready passes; a server is ready
    only once both answer (a test reading metrics right after start met a refused connection)."""
    import http.server
    import socket

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    health = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    server = TritonServer(tmp_path, http_port=health.server_address[1], metrics_port=free_port())
    try:
        assert not server.is_ready()  # health passes, metrics not listening yet
        with socket.create_server(("127.0.0.1", server.metrics_port)):
            assert server.is_ready()
    finally:
        health.shutdown()
