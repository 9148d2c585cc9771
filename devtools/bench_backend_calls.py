"""What the Python backend's round-trip calls cost the thread that makes them.

    python -m devtools.bench_backend_calls --calls 2000 --out benchmarks/results/backend-calls-cpu.json

`request.is_cancelled()` and a custom metric's `increment` / `observe` each go to the server and
back, releasing the GIL meanwhile. A decoupled model in a real tritonserver times N calls of each
alone, then with one busy Python thread beside it (which takes the GIL while the call waits, so
the caller waits to get it back, up to the switch interval), and how fast that thread ran
meanwhile; for each GIL switch interval asked. flux_bls's event loop
made such calls before every step (docs/performance.md, "Holding load"). The `writer_step_*`
rows put a step's three metric updates through flux_bls's MetricWriter until flushed, one round
trip each or coalesced.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from devtools.processes import free_port
from flux_triton.server.launcher import TritonServer, prepare_backends, pytriton_root

CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "calls" data_type: TYPE_INT32 dims: [1] } ]
output [ { name: "report" data_type: TYPE_STRING dims: [1] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "switch_interval_s" value { string_value: "%s" } }
"""

MODEL = '''
import json, threading, time
import numpy as np
import triton_python_backend_utils as pb


class TritonPythonModel:
    def initialize(self, args):
        import sys
        parameters = json.loads(args["model_config"])["parameters"]
        sys.setswitchinterval(float(parameters["switch_interval_s"]["string_value"]))
        kinds = pb.MetricFamily
        self.families = [pb.MetricFamily(name="probe_total", description="calls", kind=kinds.COUNTER),
                         pb.MetricFamily(name="probe_ms", description="ms", kind=kinds.HISTOGRAM),
                         pb.MetricFamily(name="probe_gauge", description="g", kind=kinds.GAUGE)]
        self.counter = self.families[0].Metric(labels={})
        self.histogram = self.families[1].Metric(labels={}, buckets=[1, 10, 100])
        self.gauge = self.families[2].Metric(labels={})
        from flux_triton.adapters.metrics import MetricWriter
        self.writer = MetricWriter()

    def _step(self, coalesce):
        self.writer.coalesce = coalesce  # read by the writer per batch; phases are flushed apart
        self.writer.put(self.histogram, "observe", 3.0)
        self.writer.put(self.counter, "increment", 1)
        self.writer.put(self.gauge, "set", 2)

    def execute(self, requests):
        for request in requests:
            calls = int(pb.get_input_tensor_by_name(request, "calls").as_numpy()[0])
            report = {}
            for name, call, finish in (
                    ("is_cancelled", request.is_cancelled, None),
                    ("metric_increment", lambda: self.counter.increment(1), None),
                    ("metric_observe", lambda: self.histogram.observe(3.0), None),
                    # a step's updates (one observation, an increment, a gauge) through flux_bls's
                    # MetricWriter, until flushed: each update alone, or coalesced
                    ("writer_step_each", lambda: self._step(False), self.writer.flush),
                    ("writer_step_coalesced", lambda: self._step(True), self.writer.flush)):
                began = time.perf_counter()
                for _ in range(calls):
                    call()
                if finish is not None:
                    finish()
                alone = (time.perf_counter() - began) / calls
                spins, stop = [0], threading.Event()

                def spin():
                    while not stop.is_set():
                        spins[0] += 1

                busy = threading.Thread(target=spin)
                busy.start()
                time.sleep(0.05)
                before, began = spins[0], time.perf_counter()
                time.sleep(0.2)
                free_rate = (spins[0] - before) / (time.perf_counter() - began)
                before, began = spins[0], time.perf_counter()
                for _ in range(calls):
                    call()
                if finish is not None:
                    finish()
                took = time.perf_counter() - began
                rate = (spins[0] - before) / took
                stop.set()
                busy.join()
                report[name] = {"alone_us": alone * 1e6, "beside_a_busy_thread_us": took / calls * 1e6,
                                "busy_thread_pace": rate / free_rate}
            text = np.array([json.dumps(report).encode()], dtype=object)
            request.get_response_sender().send(pb.InferenceResponse([pb.Tensor("report", text)]),
                                               flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def measure(calls: int, rounds: int, switch_interval_s: float) -> list[dict]:
    """`rounds` reports of the probe model, each timing `calls` calls of each kind, with the
    model process's GIL switch interval at `switch_interval_s`."""
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder) / "repository"
        (repository / "probe" / "1").mkdir(parents=True)
        (repository / "probe" / "config.pbtxt").write_text(CONFIG % switch_interval_s)
        (repository / "probe" / "1" / "model.py").write_text(MODEL)
        ports = [free_port() for _ in range(3)]
        server = TritonServer(repository, *ports, device="cpu")
        command = [str(pytriton_root() / "bin" / "tritonserver"), f"--model-repository={repository}",
                   f"--backend-directory={prepare_backends()}", "--pinned-memory-pool-byte-size=0",
                   "--allow-gpu-metrics=false", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
                   f"--metrics-port={ports[2]}", "--exit-timeout-secs=10"]
        log = open(Path(folder) / "tritonserver.log", "w")
        process = subprocess.Popen(command, env=server.environment(), stdout=log, stderr=subprocess.STDOUT)
        reports = []
        try:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
            deadline = time.monotonic() + 120
            while not _ready(client):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tritonserver did not load the probe; see {log.name}")
                time.sleep(0.2)
            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for _ in range(rounds):
                tensor = grpcclient.InferInput("calls", [1], "INT32")
                tensor.set_data_from_numpy(np.array([calls], dtype=np.int32))
                client.async_stream_infer("probe", [tensor])
                result, error = answers.get(timeout=300)
                if error is not None:
                    log.flush()
                    raise RuntimeError(f"{error}; tritonserver's log ends:\n"
                                       + Path(log.name).read_text()[-3000:])
                reports.append(json.loads(result.as_numpy("report")[0]))
            client.stop_stream()
        finally:
            process.terminate()
            process.wait(60)
            log.close()
    return reports


def _ready(client: grpcclient.InferenceServerClient) -> bool:
    try:
        return client.is_model_ready("probe")
    except Exception:  # not listening yet
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch-intervals", default="0.005,0.0005",
                        help="the probe process's GIL switch intervals to try, in seconds "
                             "(Python's default 0.005; flux_bls sets 0.0005)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {}
    for interval in (float(v) for v in args.switch_intervals.split(",")):
        reports = results[str(interval)] = measure(args.calls, args.rounds, interval)
        print(f"GIL switch interval {interval * 1000:g} ms, {args.calls} calls of each, "
              f"{args.rounds} rounds")
        print(f"{'call':<24}{'alone (us)':>16}{'beside a busy thread (us)':>28}{'busy thread pace':>20}")
        for name in reports[0]:
            rows = [r[name] for r in reports]
            columns = (("alone_us", 0), ("beside_a_busy_thread_us", 0), ("busy_thread_pace", 2))
            cells = [" / ".join(f"{r[key]:.{digits}f}" for r in rows) for key, digits in columns]
            print(f"{name:<24}{cells[0]:>16}{cells[1]:>28}{cells[2]:>20}")
    if args.out is not None:
        from importlib.metadata import version

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "calls": args.calls, "by_switch_interval_s": results, "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "nvidia-pytriton": version("nvidia-pytriton")},
            indent=2) + "\n")

if __name__ == "__main__":
    main()
