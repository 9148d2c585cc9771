"""`flux_*` metrics on Triton's /metrics endpoint, through the python backend's custom metrics API."""

from __future__ import annotations

from typing import Any

import torch

from flux_triton.specs import NETWORKS

LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
QUEUE_WAIT_BUCKETS_MS = [0, 10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000, 300000]
OUTCOMES = ("completed", "partial", "cancelled", "invalid", "failed")


class _Labelled:
    """A metric family whose metrics all carry `labels` besides their own."""

    def __init__(self, family: Any, labels: dict[str, str]):
        self.family, self.labels = family, labels

    def Metric(self, labels: dict[str, str], **options) -> Any:  # noqa: N802 (pb_utils' spelling)
        return self.family.Metric(labels={**labels, **self.labels}, **options)


class BlsMetrics:
    """The BLS's metric families; `pb` is triton_python_backend_utils (or a stand-in).

    An instance on a GPU labels every metric with `gpu`, so the instances of a server that spans
    several GPUs (GPUS) count apart; on a CPU the labels are as they always were. `networks`: those
    of the served model's family (`specs.networks`).
    """

    def __init__(self, pb: Any, gpu: int | None = None, networks: tuple[str, ...] = NETWORKS):
        self.families = []  # a MetricFamily must outlive its metrics
        on_gpu = {} if gpu is None else {"gpu": str(gpu)}

        def family(name, description, kind):
            self.families.append(pb.MetricFamily(name=name, description=description, kind=kind))
            return _Labelled(self.families[-1], on_gpu)

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

    def observe_dit_batch(self, rows: int, calls: int) -> None:
        self.dit_batch.observe(rows)
        if calls > 1:
            self.dit_merged.increment(1)

    def sample_gpu_memory(self) -> None:
        if self.gpu_memory is not None:
            free, total = torch.cuda.mem_get_info(self.gpu)
            self.gpu_memory.set(total - free)
