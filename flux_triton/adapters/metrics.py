"""`flux_*` metrics on Triton's /metrics endpoint, through the python backend's custom metrics API."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

from flux_triton.specs import NETWORKS

LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
QUEUE_WAIT_BUCKETS_MS = [0, 10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000, 300000]
OUTCOMES = ("completed", "partial", "cancelled", "invalid", "failed")


class MetricWriter:
    """Applies metric updates on a thread of its own.

    Every update of a python-backend metric is a round trip to the server, too costly for
    flux_bls's event loop under load (docs/performance.md, "Holding load"). The writer takes
    whatever has queued up at once and applies it in order, except that with `coalesce` the
    increments of one metric become one increment and a gauge gets only its last value: the same
    totals in fewer round trips when updates come faster than it applies them. `flush` waits for
    the updates queued before it.
    """

    def __init__(self, on_error: Callable[[str], None] | None = None, coalesce: bool = True):
        self.on_error, self.coalesce = on_error, coalesce
        self.applied = 0  # round trips made
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="flux_bls_metrics", daemon=True)
        self._thread.start()

    def put(self, metric: Any, operation: str, value: float) -> None:
        self._queue.put((metric, operation, value))

    def flush(self, timeout_s: float = 10.0) -> bool:
        applied = threading.Event()
        self._queue.put(applied)
        return applied.wait(timeout_s)

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending: dict[tuple[int, str], list] = {}  # (metric, operation) -> [metric, operation, value]
            for item in batch:
                if item is None:
                    self._apply(pending.values())
                    return
                if isinstance(item, threading.Event):
                    self._apply(pending.values())
                    pending = {}
                    item.set()
                    continue
                metric, operation, value = item
                if not self.coalesce or operation == "observe":
                    self._apply([item])
                    continue
                key = (id(metric), operation)
                if key in pending and operation == "increment":
                    pending[key][2] += value
                else:
                    pending[key] = [metric, operation, value]
            self._apply(pending.values())

    def _apply(self, updates: Iterable) -> None:
        for metric, operation, value in updates:
            self.applied += 1
            try:
                getattr(metric, operation)(value)
            except Exception as exc:  # a metric must not stop the others, nor any request
                if self.on_error is not None:
                    self.on_error(f"flux_bls: metric {operation}({value!r}) failed: {exc!r}")


class _Deferred:
    """A metric whose updates go through a MetricWriter (an increment by 0 goes nowhere); reads,
    such as a stand-in's `value`, go to the metric."""

    def __init__(self, metric: Any, writer: MetricWriter):
        self.metric, self.writer = metric, writer

    def increment(self, value: float) -> None:
        if value:
            self.writer.put(self.metric, "increment", value)

    def observe(self, value: float) -> None:
        self.writer.put(self.metric, "observe", value)

    def set(self, value: float) -> None:
        self.writer.put(self.metric, "set", value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class _Labelled:
    """A metric family whose metrics all carry `labels` besides their own, updated through
    `writer`."""

    def __init__(self, family: Any, labels: dict[str, str], writer: MetricWriter):
        self.family, self.labels, self.writer = family, labels, writer

    def Metric(self, labels: dict[str, str], **options) -> Any:  # noqa: N802 (pb_utils' spelling)
        return _Deferred(self.family.Metric(labels={**labels, **self.labels}, **options), self.writer)


class BlsMetrics:
    """The BLS's metric families; `pb` is triton_python_backend_utils (or a stand-in).

    An instance on a GPU labels every metric with `gpu`, so the instances of a server that spans
    several GPUs (GPUS) count apart; on a CPU the labels are as they always were. `networks`: those
    of the served model's family (`specs.networks`). Updates reach Triton from a MetricWriter's
    thread: `flush` before a response that should find them there.
    """

    def __init__(self, pb: Any, gpu: int | None = None, networks: tuple[str, ...] = NETWORKS,
                 on_error: Callable[[str], None] | None = None):
        self.families = []  # a MetricFamily must outlive its metrics
        self.writer = MetricWriter(on_error)
        on_gpu = {} if gpu is None else {"gpu": str(gpu)}

        def family(name, description, kind):
            self.families.append(pb.MetricFamily(name=name, description=description, kind=kind))
            return _Labelled(self.families[-1], on_gpu, self.writer)

        histogram, counter = pb.MetricFamily.HISTOGRAM, pb.MetricFamily.COUNTER
        latency = family("flux_component_latency_ms", "BLS call latency per component (ms)", histogram)
        self.component_latency = {
            m: latency.Metric(labels={"model": m}, buckets=LATENCY_BUCKETS_MS)
            for m in ("tokenizer", *networks)
        }
        self.step_latency = family("flux_step_latency_ms", "Denoising step latency (ms)", histogram
                                   ).Metric(labels={}, buckets=LATENCY_BUCKETS_MS)
        self.request_latency = family("flux_request_latency_ms", "Request latency, start to image (ms)",
                                      histogram).Metric(labels={}, buckets=LATENCY_BUCKETS_MS)
        requests = family("flux_requests_total", "Requests by outcome", counter)
        self.outcomes = {o: requests.Metric(labels={"outcome": o}) for o in OUTCOMES}
        self.steps = family("flux_steps_total", "Denoising steps run", counter).Metric(labels={})
        self.images = family("flux_images_total", "Images generated", counter).Metric(labels={})
        retries = family("flux_component_retries_total", "Component calls retried", counter)
        splits = family("flux_batch_splits_total", "Batches halved after out-of-memory", counter)
        self.retries = {m: retries.Metric(labels={"model": m}) for m in networks}
        self.splits = {m: splits.Metric(labels={"model": m}) for m in networks}
        self.dit_batch = family("flux_dit_batch_size", "Rows per DiT call (batching across requests)",
                                histogram).Metric(labels={}, buckets=[1, 2, 4, 8, 16, 32])
        self.dit_merged = family("flux_dit_merged_calls_total",
                                 "DiT calls that served several requests at once", counter
                                 ).Metric(labels={})
        # what least-loaded dispatch compares (flux_triton.dispatch), per instance
        self.active_requests = family("flux_active_requests", "Requests this instance is serving",
                                      pb.MetricFamily.GAUGE).Metric(labels={})
        # the line of flux_triton.admission (MAX_INFLIGHT, MAX_QUEUE), per instance
        self.queue_length = family("flux_queue_length", "Requests waiting in line for this instance",
                                   pb.MetricFamily.GAUGE).Metric(labels={})
        self.queue_wait = family("flux_queue_wait_ms", "Time requests waited in line before they ran "
                                 "(ms)", histogram).Metric(labels={}, buckets=QUEUE_WAIT_BUCKETS_MS)
        self.queue_refusals = family("flux_queue_refusals_total",
                                     "Requests refused because the queue was full (MAX_QUEUE)",
                                     counter).Metric(labels={})
        self.gpu = gpu
        self.gpu_memory = None
        if gpu is not None:
            self.gpu_memory = family("flux_gpu_memory_used_bytes", "GPU memory in use (device-wide)",
                                     pb.MetricFamily.GAUGE).Metric(labels={})

    def flush(self) -> bool:
        """Wait until the updates made so far are Triton's."""
        return self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def observe_dit_batch(self, rows: int, calls: int) -> None:
        self.dit_batch.observe(rows)
        if calls > 1:
            self.dit_merged.increment(1)

    def sample_gpu_memory(self) -> None:
        if self.gpu_memory is not None:
            free, total = torch.cuda.mem_get_info(self.gpu)
            self.gpu_memory.set(total - free)
