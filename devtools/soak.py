"""`make soak`: a supervised server under mixed load with faults for `--minutes` (30 by default),
on the CPU with the tiny schnell model.

Concurrent clients send, at random: valid generations (each one of a few fixed requests whose
image is known in advance, so a stream that got another's image is caught), generations cancelled
after some steps, clients that drop the connection mid-stream, invalid requests, and bursts past
the queue's bound. Meanwhile transient failures (UNAVAILABLE, retried), persistent ones (every
call fails for a while) and hangs are injected into the components, and one model process is
killed every `--kill-every` minutes (the supervisor heals it; flux_bls's death restarts the
server). It checks that every accepted request ends with its image or a clear error and none
hangs, that each process's memory stays flat after warm-up, that no shared memory is left, and
writes the counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from devtools.processes import free_port
from flux_triton.clients.stream_client import build_inputs, input_arrays, stream_generate
from flux_triton.errors import client_error_kind
from flux_triton.export.repository import write_repository
from flux_triton.model_info import load_model_info
from flux_triton.server.launcher import (
    MALLOC_ENV,
    SHM_FOLDER,
    SHM_PREFIX,
    TritonServer,
    jemalloc_path,
)
from flux_triton.server.supervisor import SERVER, Supervisor, model_processes

COMPONENTS = ("tokenizer", "clip_encoder", "t5_encoder", "dit_transformer", "vae_decoder")
KILLED_IN_TURN = (*COMPONENTS, "flux_bls")
# What a valid request may end with besides its image: errors a client is told to retry or that
# name their cause (the server restarting a component, a full queue, a persistent failure).
CLEAR_ERRORS = {"unavailable", "resource_exhausted", "failed"}
STREAM_TIMEOUT_S = 120.0  # a stream silent this long is counted as hung
WARMUP_S = 60.0  # RSS is compared from here on
RSS_SAMPLE_S = 10.0


def known_requests(count: int) -> list[dict]:
    """The fixed valid requests clients pick from (64 or 96 px, 2-4 steps, their own seeds)."""
    rng = random.Random(7)
    return [dict(prompt=f"soak scene {i}: a red circle", height=64, width=rng.choice([64, 96]),
                 num_inference_steps=rng.randint(2, 4), seed=1000 + i) for i in range(count)]


def expected_images(model_dir: Path, requests: list[dict]) -> list[np.ndarray]:
    """Each request's image from the in-process pipeline (what the server must send back)."""
    from flux_triton.request import validate_request
    from flux_triton.runtime.in_process import TorchFluxModels, run_in_process

    info = load_model_info(model_dir)
    models = TorchFluxModels(info)
    return [list(run_in_process(validate_request(input_arrays(**r), info), info, models))[-1]
            .image.numpy() for r in requests]


def rss_by_process(server: TritonServer) -> dict[tuple[str, int], int]:
    """(model or tritonserver, pid) -> resident bytes, for the server and its stubs now."""
    process = server.process
    if process is None or process.poll() is not None:
        return {}
    found = {(SERVER, process.pid): process.pid}
    for stub in model_processes(process.pid, server.repository):
        found[(stub.model, stub.pid)] = stub.pid
    sizes = {}
    for key, pid in found.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            sizes[key] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return sizes


class Soak:
    def __init__(self, server: TritonServer, supervisor: Supervisor, fault_dir: Path,
                 requests: list[dict], images: list[np.ndarray], seed: int = 0):
        self.server, self.supervisor, self.fault_dir = server, supervisor, fault_dir
        self.requests, self.images = requests, images
        self.url = f"127.0.0.1:{server.grpc_port}"
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.errors: Counter = Counter()
        self.error_samples: dict[str, str] = {}
        self.problems: list[str] = []  # lost, hung, mixed or unclear: each fails the soak
        self.timeline: list[dict] = []
        self.rss: dict[tuple[str, int], list[tuple[float, int]]] = {}
        self.stop = threading.Event()
        self.began = time.monotonic()

    def note(self, event: str, **details) -> None:
        with self.lock:
            self.timeline.append({"t_s": round(time.monotonic() - self.began, 1), "event": event,
                                  **details})

    def count(self, outcome: str, error: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if error is not None:
                kind = client_error_kind(error)
                self.errors[kind] += 1
                self.error_samples.setdefault(kind, error[:300])

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(f"{time.monotonic() - self.began:.0f} s: {text}")

    # -- clients ---------------------------------------------------------------------------
    def client_loop(self, worker: int) -> None:
        rng = random.Random(worker)
        while not self.stop.is_set():
            roll = rng.random()
            try:
                if roll < 0.55:
                    self.valid(rng)
                elif roll < 0.7:
                    self.cancelled(rng)
                elif roll < 0.8:
                    self.dropped(rng)
                elif roll < 0.9:
                    self.invalid(rng)
                else:
                    self.burst(rng)
            except Exception as exc:  # e.g. no server to connect to while it restarts
                self.count("transport_error", f"[UNAVAILABLE] {type(exc).__name__}: {exc}")
                time.sleep(1)

    def _generate(self, fields: dict, **options):
        client = grpcclient.InferenceServerClient(self.url)
        try:
            return stream_generate(client, build_inputs(**fields), timeout_s=STREAM_TIMEOUT_S,
                                   **options)
        finally:
            client.close()

    def broken(self, what: str, exc: Exception) -> None:
        """A stream that raised: silent for STREAM_TIMEOUT_S (hung: a failure of the soak), or
        broken under the client by the transport (the server went away mid-stream, e.g. a
        whole-server restart): the client is told at once, which counts as a clear error."""
        if isinstance(exc, queue.Empty):
            self.problem(f"{what} hung: nothing for {STREAM_TIMEOUT_S:.0f} s")
            self.count("hung")
        else:
            self.count("transport_error", f"[UNAVAILABLE] {type(exc).__name__}: {exc}")

    def valid(self, rng: random.Random) -> None:
        index = rng.randrange(len(self.requests))
        try:
            result = self._generate(self.requests[index])
        except Exception as exc:
            self.broken(f"request {index}", exc)
            return
        if result.error is None:
            if result.image is None or not np.array_equal(result.image, self.images[index]):
                self.problem(f"request {index} got an image that is not its own")
                self.count("mixed")
            else:
                self.count("image")
        elif client_error_kind(result.error) in CLEAR_ERRORS:
            self.count("clear_error", result.error)
        else:
            self.problem(f"request {index} ended with an unclear error: {result.error[:200]}")
            self.count("unclear_error", result.error)

    def cancelled(self, rng: random.Random) -> None:
        fields = dict(rng.choice(self.requests), num_inference_steps=8)
        try:
            result = self._generate(fields, stop_after_steps=rng.randint(1, 3))
        except Exception as exc:
            self.broken("a cancelled request", exc)
            return
        self.count("cancelled" if result.error is None else "clear_error", result.error)

    def dropped(self, rng: random.Random) -> None:
        """A client that goes away mid-stream without a word (its connection closed)."""
        client = grpcclient.InferenceServerClient(self.url)
        got = threading.Event()
        client.start_stream(callback=lambda result, error: got.set())
        client.async_stream_infer("flux_bls", build_inputs(**dict(rng.choice(self.requests),
                                                                  num_inference_steps=8)))
        got.wait(rng.uniform(0.05, 1.0))
        client.close()
        self.count("dropped")

    def invalid(self, rng: random.Random) -> None:
        fields = rng.choice([dict(prompt="x", height=100), dict(prompt="x", num_inference_steps=0),
                             dict(prompt="x", strength=3.0), dict(prompt="x" * 5000),
                             dict(prompt="x", cache_threshold=-1.0)])
        try:
            result = self._generate(fields)
        except Exception as exc:
            self.broken("an invalid request", exc)
            return
        if result.error is not None and client_error_kind(result.error) == "invalid_argument":
            self.count("invalid_refused")
        elif result.error is not None and client_error_kind(result.error) in CLEAR_ERRORS:
            self.count("clear_error", result.error)  # e.g. refused for a full queue first
        else:
            self.problem(f"invalid request {fields} was not refused: {result.error}")
            self.count("unclear_error", result.error)

    def burst(self, rng: random.Random) -> None:
        """Several requests at once from one client: some may be refused for a full queue."""
        threads = [threading.Thread(target=self.valid, args=(random.Random(rng.random()),))
                   for _ in range(rng.randint(4, 12))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # -- faults ----------------------------------------------------------------------------
    def fault_loop(self, every_s: float) -> None:
        while not self.stop.wait(every_s):
            model = self.rng.choice(COMPONENTS)
            kind = self.rng.choice(["transient", "transient", "persistent", "hang"])
            plan = {"transient": {"fail_next": 2}, "persistent": {"error_next": 10**6},
                    "hang": {"hang_next": 1}}[kind]
            path = self.fault_dir / f"{model}.json"
            path.write_text(json.dumps(plan))
            self.note("fault", model=model, kind=kind)
            if kind == "persistent":  # every call fails for a while, then it is lifted
                self.stop.wait(self.rng.uniform(2, 6))
                path.unlink(missing_ok=True)
                self.note("fault_lifted", model=model)

    def kill_loop(self, every_s: float) -> None:
        turn = 0
        while not self.stop.wait(every_s):
            model = KILLED_IN_TURN[turn % len(KILLED_IN_TURN)]
            turn += 1
            process = self.server.process
            stubs = [] if process is None else [p for p in model_processes(process.pid,
                                                                           self.server.repository)
                                                if p.model == model]
            if not stubs:
                self.note("kill_skipped", model=model)
                continue
            os.kill(stubs[0].pid, signal.SIGKILL)
            self.note("killed", model=model, pid=stubs[0].pid)

    def rss_loop(self) -> None:
        while not self.stop.wait(RSS_SAMPLE_S):
            now = time.monotonic() - self.began
            for key, size in rss_by_process(self.server).items():
                with self.lock:
                    self.rss.setdefault(key, []).append((now, size))

    def rss_growth(self) -> dict:
        """Per process that lived past warm-up: its RSS growth from its first sample after
        warm-up (or after its own start, for a process restarted later) to its last."""
        growth = {}
        for (model, pid), samples in self.rss.items():
            born = samples[0][0]
            settled = [size for t, size in samples if t >= max(WARMUP_S, born + WARMUP_S)]
            if len(settled) >= 3:
                growth[f"{model}:{pid}"] = round(settled[-1] / settled[0] - 1, 4)
        return growth


def tritonserver_crashes(log_lines: list[str]) -> list[str]:
    """tritonserver's own crashes in its log (the supervisor restarts it): assertion failures and
    fatal signals (SIGINT, "Signal (2)", is the stop)."""
    return [line.strip() for line in log_lines if "ASSERTION FAILED" in line or
            (line.startswith("Signal (") and not line.startswith("Signal (2)"))]


def run(minutes: float, clients: int, kill_every_min: float, fault_every_s: float,
        model_dir: Path, workdir: Path, max_queue: int) -> dict:
    requests = known_requests(6)
    images = expected_images(model_dir, requests)
    fault_dir = workdir / "faults"
    fault_dir.mkdir(parents=True, exist_ok=True)
    repository = write_repository(model_dir, workdir / "repository", max_queue=max_queue)
    shm_before = sorted(p.name for p in SHM_FOLDER.glob(f"{SHM_PREFIX}*"))
    server = TritonServer(repository, free_port(), free_port(), free_port(),
                          log_file=workdir / "tritonserver.log",
                          extra_env={"FLUX_TRITON_FAULT_DIR": str(fault_dir)})
    supervisor = Supervisor(server, probe_interval_s=2, probe_timeout_s=15, not_ready_bound_s=20)
    supervisor.start()
    soak = Soak(server, supervisor, fault_dir, requests, images)
    threads = [threading.Thread(target=soak.client_loop, args=(i,), daemon=True)
               for i in range(clients)]
    threads += [threading.Thread(target=soak.fault_loop, args=(fault_every_s,), daemon=True),
                threading.Thread(target=soak.kill_loop, args=(kill_every_min * 60,), daemon=True),
                threading.Thread(target=soak.rss_loop, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        soak.stop.wait(minutes * 60)
    finally:
        soak.stop.set()
        for path in fault_dir.glob("*.json"):
            path.unlink()
        for thread in threads:
            thread.join(STREAM_TIMEOUT_S + 30)
        still = [t.name for t in threads if t.is_alive()]
        if still:
            soak.problem(f"threads still running after the soak: {still}")
        code = supervisor.stop(timeout_s=30)
    shm_left = sorted(set(p.name for p in SHM_FOLDER.glob(f"{SHM_PREFIX}*")) - set(shm_before))
    log = (workdir / "tritonserver.log").read_text(errors="replace").splitlines()
    aborts = tritonserver_crashes(log)
    growth = soak.rss_growth()
    accepted = sum(soak.outcomes[k] for k in ("image", "clear_error", "transport_error", "mixed",
                                                "unclear_error", "hung"))
    series = {f"{model}:{pid}": samples[::6] for (model, pid), samples in soak.rss.items()
              if model == SERVER or len(samples) > 12}
    return {
        "minutes": minutes, "clients": clients, "kill_every_min": kill_every_min,
        "fault_every_s": fault_every_s, "max_queue": max_queue, "model_dir": str(model_dir),
        "outcomes": dict(soak.outcomes), "errors_by_kind": dict(soak.errors),
        "error_samples": soak.error_samples,
        "valid_requests": accepted, "lost": soak.outcomes["hung"] + soak.outcomes["mixed"],
        "problems": soak.problems[:50],
        "rss_growth_after_warmup": growth,
        "rss_series_bytes": series,  # (seconds, bytes) every minute, per long-lived process
        "rss_max_growth": max(growth.values(), default=None),
        "rss_median_growth": statistics.median(growth.values()) if growth else None,
        "shared_memory_left": shm_left, "server_removed_on_stop": [str(p) for p in server.removed_regions],
        "server_exit_code": code,
        "allocator": "glibc" if os.environ.get(MALLOC_ENV) == "system" or not jemalloc_path()
        else jemalloc_path(),
        "tritonserver_aborts": aborts,
        "supervisor": {"restarts": supervisor.restarts, "server_restarts": supervisor.server_restarts,
                       "probes_unanswered": supervisor.probes_unanswered,
                       "not_ready_s": round(supervisor.not_ready_s, 1), "failed": supervisor.failed,
                       "events": supervisor.events[-60:]},
        "timeline": soak.timeline,
        "passed": not soak.problems and not shm_left and not supervisor.failed
        and (not growth or max(growth.values()) < 0.05),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--kill-every", type=float, default=5.0, help="minutes between kills")
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny-flux-schnell"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flux-soak-"))
    result = run(args.minutes, args.clients, args.kill_every, args.fault_every, args.model_dir,
                 workdir, args.max_queue)
    summary = {k: result[k] for k in ("outcomes", "errors_by_kind", "lost", "rss_max_growth",
                                      "shared_memory_left", "passed")}
    print(json.dumps(summary, indent=1))
    if result["problems"]:
        print("problems:\n  " + "\n  ".join(result["problems"][:20]), file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
