"""Keeps a tritonserver serving: finds Python-model processes that died or stopped, brings them back,
and makes readiness say so meanwhile.

Triton 2.51 does neither by itself: after a model's stub process is killed (the out-of-memory
killer, a segfault, a poisoned CUDA context) every request to that model fails with "Stub process
... is not healthy" for good, while /v2/health/ready keeps answering 200.

- A component (tokenizer, CLIP, T5, DiT, VAE) is unloaded at once, which turns the server's and the
  model's readiness false and makes the requests waiting on it fail (flux_bls ends their streams
  with UNAVAILABLE), then loaded again, which starts a fresh process.
- `flux_bls` itself is different: its in-flight streams are held by the dead process, and Triton
  2.51 never ends them, not even on unload. The supervisor restarts the whole server, which closes
  those streams (the client sees UNAVAILABLE from gRPC) and brings everything back.
- A stopped process (SIGSTOP, state T) is treated as dead: killed, then handled as above.
- A model that stays not READY in Triton's repository index past `not_ready_bound_s` (stuck
  UNLOADING with its process alive, say) is recovered the same way.
- A model whose process lives but no longer answers (a hung execute: state S, no sign of
  trouble) is found by probes: every `probe_interval_s` each READY model gets a request its own
  execute answers at once (`TritonServer.probe`); one that has not answered in `probe_timeout_s`
  is stuck, and recovered as if dead. The bound must outlast the longest call a model may be
  busy with ahead of the probe (a queue of DiT calls at the largest size served).
- Recovery that keeps failing past `liveness_bound_s` stops the server, so liveness fails and an
  orchestrator restarts the pod.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flux_triton.serving_config import RepositoryConfig

log = logging.getLogger(__name__)
STUB = "triton_python_backend_stub"
SERVER = "tritonserver"  # the server process itself, in the supervisor's tables
DEAD_STATES = {"T", "t", "Z", "X"}  # stopped, traced, zombie, dead


@dataclass(frozen=True)
class ModelProcess:
    pid: int
    model: str
    state: str  # /proc/<pid>/stat state: R, S, D, T, Z, ...


def model_processes(process_group: int, repository: Path) -> list[ModelProcess]:
    """The Python stub processes of the server whose process group is `process_group`."""
    found = []
    repository = Path(repository).resolve()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != process_group:  # field 5: process group
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if len(argv) < 2 or not argv[0].decode(errors="replace").endswith(STUB):
            continue
        model_py = Path(argv[1].decode(errors="replace"))  # <repository>/<model>/<version>/model.py
        if model_py.parent.parent.parent.resolve() == repository:
            found.append(ModelProcess(int(entry.name), model_py.parent.parent.name, fields[0]))
    return found


class Supervisor:
    """Owns one `TritonServer` (explicit model-control mode): starts it, watches it from a thread,
    brings back what dies, and stops it.

    `server` needs `repository`, `process`, `launch()`, `wait_ready(timeout_s)`, `stop(timeout_s)`,
    `is_ready()`, `model_control(model, action)` and `model_states()`. With `metrics_port`, the
    supervisor's Prometheus metrics are served there (on `metrics_host`).
    """

    not_ready_bound_s = 60.0  # a model not READY in the repository index this long is recovered
    probe_interval_s = 5.0  # how often each model is probed (0: never)
    probe_timeout_s = 120.0  # a probe unanswered this long: the model is stuck

    def __init__(self, server, poll_s: float = 0.5, liveness_bound_s: float = 120.0,
                 not_ready_bound_s: float | None = None, metrics_port: int | None = None,
                 metrics_host: str | None = None, probe_interval_s: float | None = None,
                 probe_timeout_s: float | None = None):
        self.server = server
        self.poll_s = poll_s
        self.liveness_bound_s = liveness_bound_s
        if not_ready_bound_s is not None:
            self.not_ready_bound_s = not_ready_bound_s
        if probe_interval_s is not None:
            self.probe_interval_s = probe_interval_s
        if probe_timeout_s is not None:
            self.probe_timeout_s = probe_timeout_s
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host or getattr(server, "host", "127.0.0.1")
        deployment = RepositoryConfig.read(server.repository)
        self.models = deployment.python_models()
        # what the server loaded at start: a stray folder, or one an operator unloads, is not ours
        self.served = set(deployment.names)
        self.not_ready_since: dict[str, float] = {}  # model -> when it was first seen not READY
        self.probing: dict[str, float] = {}  # model -> when its unanswered probe was sent
        self.probed_at: dict[str, float] = {}  # model -> when its last probe was answered
        self.probes_unanswered = 0  # probes that found a stuck model
        self._probes = ThreadPoolExecutor(max_workers=max(1, len(self.models)),
                                          thread_name_prefix="flux-probe")
        self._ready: set[str] = set()  # READY at the last look at the index
        self.events: list[dict] = []  # the timeline: detected, unloaded, ready, ...
        self.restarts: dict[str, int] = {name: 0 for name in (*self.models, SERVER)}
        self.server_restarts = 0
        self.not_ready_s = 0.0
        self.failed = False  # recovery failed past the bound: the server was stopped
        self.metrics = None
        self._stop = threading.Event()
        self._launching = threading.Lock()  # a stop never races a restart's launch
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> float:
        """Start the server, then watch it; the start-to-ready seconds. The metrics port is bound
        first, so a busy one fails before the server spends its start."""
        began = time.monotonic()
        if self.metrics_port:
            SupervisorMetrics(self, self.metrics_port, self.metrics_host)
        try:
            self.server.start(timeout_s=timeout_s)
        except BaseException:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            raise
        self._thread = threading.Thread(target=self._run, name="flux-supervisor", daemon=True)
        self._thread.start()
        return time.monotonic() - began

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Stop watching (no restart starts after this, one under way gives up waiting), then
        stop the server; its exit code."""
        self._stop.set()
        with self._launching:
            pass  # a restart past this point has launched; one before it will not
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self._probes.shutdown(wait=False, cancel_futures=True)
        return self.server.stop(timeout_s=timeout_s)

    def _record(self, event: str, **details) -> None:
        entry = {"t": round(time.time(), 3), "event": event, **details}
        self.events.append(entry)
        log.warning("supervisor: %s", entry)

    # -- detection -------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """Models whose processes died or stopped, with what was seen."""
        process = self.server.process
        if process is None:
            return {}
        if process.poll() is not None:
            return {SERVER: f"exited with code {process.returncode}"}
        seen: dict[str, list[ModelProcess]] = {name: [] for name in self.models}
        for stub in model_processes(process.pid, self.server.repository):
            if stub.model in seen:
                seen[stub.model].append(stub)
        found = {}
        for name, model in self.models.items():
            stopped = [p for p in seen[name] if p.state in DEAD_STATES]
            alive = [p for p in seen[name] if p.state not in DEAD_STATES]
            if stopped:
                what = "stopped" if stopped[0].state in "Tt" else "dead"
                found[name] = f"process {stopped[0].pid} is {what}"
            elif len(alive) < model.processes:
                found[name] = f"{model.processes - len(alive)} of {model.processes} processes gone"
        try:
            stuck = self.stuck_models()
        except Exception as exc:  # an index that does not answer must not hide dead processes
            log.warning("supervisor: repository index unreadable: %s", exc)
            stuck = {}
        for name, what in stuck.items():
            found.setdefault(name, what)
        for name, what in self.unanswered_probes().items():
            found.setdefault(name, what)
        return found

    def unanswered_probes(self) -> dict[str, str]:
        """Models whose probe is unanswered past `probe_timeout_s`; sends the probes that are due."""
        if not self.probe_interval_s:
            return {}
        now = time.monotonic()
        found = {}
        for name in self.models:
            sent = self.probing.get(name)
            if sent is not None:
                if now - sent > self.probe_timeout_s:
                    found[name] = f"answered no probe in {now - sent:.0f} s (its process alive)"
            elif name in self._ready and now - self.probed_at.get(name, 0.0) >= self.probe_interval_s:
                self.probing[name] = now
                self._probes.submit(self._probe, name, now)
        return found

    def _probe(self, model: str, sent: float) -> None:
        try:
            self.server.probe(model, timeout_s=self.probe_timeout_s + 5)
        except Exception:  # no answer in time: the entry stays, and outlives the bound
            if time.monotonic() - sent < self.probe_timeout_s:  # refused at once: not stuck
                self._probe_done(model, sent)
            return
        self._probe_done(model, sent)

    def _probe_done(self, model: str, sent: float) -> None:
        if self.probing.get(model) == sent:  # not a probe from before a recovery
            self.probing.pop(model, None)
            self.probed_at[model] = time.monotonic()

    def stuck_models(self) -> dict[str, str]:
        """Models not READY in Triton's repository index for longer than `not_ready_bound_s`."""
        now = time.monotonic()
        states = {n: s for n, s in self.server.model_states().items() if n in self.served}
        self._ready = {name for name, state in states.items() if state == "READY"}
        for name, state in states.items():
            if state == "READY":
                self.not_ready_since.pop(name, None)
            else:
                self.not_ready_since.setdefault(name, now)
        return {name: f"{states[name] or 'not ready'} for {now - since:.0f} s"
                for name, since in self.not_ready_since.items()
                if name in states and now - since > self.not_ready_bound_s}

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                problems = self.problems()
            except Exception as exc:  # a bad /proc read must not end supervision
                log.warning("supervisor: check failed: %s", exc)
                continue
            for model, seen in problems.items():
                if self._stop.is_set():
                    return
                self.recover(model, seen)
                break  # a whole-server restart changes every process: look again

    # -- recovery --------------------------------------------------------------------------
    def recover(self, model: str, seen: str) -> None:
        """Bring `model` back; stop the server if that keeps failing past the liveness bound."""
        began = time.monotonic()
        if "probe" in seen:
            self.probes_unanswered += 1
        self._record("detected", model=model, seen=seen)
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            try:
                if model == SERVER or (model in self.models and self.models[model].decoupled):
                    self._restart_server(model)
                else:
                    self._reload(model)
                break
            except Exception as exc:
                if self._stop.is_set():  # stopped meanwhile: what failed is the stop's doing
                    return
                waited = time.monotonic() - began
                self._record("recovery_failed", model=model, attempt=attempt, error=str(exc)[:300])
                if waited > self.liveness_bound_s:
                    self._record("giving_up", model=model, after_s=round(waited, 1))
                    self.failed = True
                    self._stop.set()
                    self.server.stop(timeout_s=5)
                    return
                self._stop.wait(min(2.0 * attempt, 10.0))
        if self._stop.is_set():
            return
        took = time.monotonic() - began
        self.not_ready_since.clear()  # a restart or reload changed what the index says
        self.probing.clear()  # probes sent before it tell nothing of the new processes
        self._ready.discard(model)
        self.not_ready_s += took
        metrics = self.metrics  # stop() may clear it meanwhile
        if metrics is not None:
            metrics.observe(model, took, whole_server=model == SERVER
                                 or (model in self.models and self.models[model].decoupled))
        self._record("recovered", model=model, seconds=round(took, 2))

    def _kill(self, model: str) -> None:
        if self.server.process is None or self.server.process.poll() is not None:
            return
        for stub in model_processes(self.server.process.pid, self.server.repository):
            if stub.model == model:
                try:
                    os.kill(stub.pid, signal.SIGKILL)
                    os.kill(stub.pid, signal.SIGCONT)  # a stopped process must run to die
                except ProcessLookupError:
                    pass

    def _reload(self, model: str) -> None:
        """Unload (readiness goes false, waiting requests fail), then load a fresh process."""
        self._kill(model)
        self.server.model_control(model, "unload")
        self._record("unloaded", model=model, server_ready=self.server.is_ready())
        self.server.model_control(model, "load")
        self.restarts[model] = self.restarts.get(model, 0) + 1
        self._record("loaded", model=model, server_ready=self.server.is_ready())

    def _restart_server(self, model: str) -> None:
        """Stop the whole server at once (its streams end for the clients) and start it again."""
        self._kill(model)
        self.server.stop(timeout_s=2)
        self._record("server_stopped", model=model)
        with self._launching:
            if self._stop.is_set():
                return
            self.server.launch()
        self.server.wait_ready(timeout_s=600, cancelled=self._stop)
        if self._stop.is_set():  # stopped while it started: the stop owns the server now
            return
        self.restarts[model] += 1
        self.server_restarts += 1
        self._record("server_restarted", model=model, server_ready=self.server.is_ready())


class SupervisorMetrics:
    """Prometheus metrics of the supervisor, on a port of their own (Triton's /metrics endpoint
    belongs to the server, which the supervisor may have to restart)."""

    def __init__(self, supervisor: Supervisor, port: int, host: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.restarts = Counter("flux_component_restarts", "Model processes restarted, by model",
                                ["model"], registry=self.registry)
        self.server_restarts = Counter("flux_server_restarts",
                                       "Whole-server restarts (a flux_bls process died)",
                                       registry=self.registry)
        self.not_ready = Counter("flux_not_ready_seconds", "Time spent recovering, not ready",
                                 registry=self.registry)
        self.failed = Gauge("flux_supervisor_failed", "1 once recovery failed past the liveness bound",
                            registry=self.registry)
        self.failed.set_function(lambda: float(supervisor.failed))
        for model in supervisor.models:
            self.restarts.labels(model=model)
        self.http, self.thread = start_http_server(port, addr=host, registry=self.registry)
        supervisor.metrics = self

    def observe(self, model: str, seconds: float, whole_server: bool) -> None:
        self.restarts.labels(model=model).inc()
        self.not_ready.inc(seconds)
        if whole_server:
            self.server_restarts.inc()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
