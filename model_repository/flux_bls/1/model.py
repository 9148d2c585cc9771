"""Triton Python model `flux_bls`: decoupled, streams one response per denoising step, then the image.

The pipeline itself is `flux_triton.pipeline.generate`; this adapter turns its model calls into BLS
requests (retried, batch-halved on out-of-memory), its events into streamed responses, and its
timings into Triton metrics.
"""

import asyncio
import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage, StageFailed, generate
from flux_triton.python_backend import (
    error_response,
    from_torch,
    instance_device,
    model_parameters,
    to_torch,
)
from flux_triton.recovery import (
    RecoveryStats,
    RetryPolicy,
    call_with_recovery,
    classify_failure,
)
from flux_triton.request import InvalidRequest, ServingLimits, validate_request
from flux_triton.specs import COMPONENTS, NETWORKS, bls_spec, component_specs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class BlsMetrics:
    """flux_* metrics on Triton's /metrics endpoint."""

    def __init__(self):
        self.families = []  # a MetricFamily must outlive its metrics

        def family(name, description, kind):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1]

        histogram, counter = pb_utils.MetricFamily.HISTOGRAM, pb_utils.MetricFamily.COUNTER
        latency = family("flux_component_latency_ms", "BLS call latency per component (ms)", histogram)
        self.component_latency = {
            m: latency.Metric(labels={"model": m}, buckets=LATENCY_BUCKETS_MS)
            for m in COMPONENTS
        }
        self.step_latency = family("flux_step_latency_ms", "Denoising step latency (ms)", histogram
                                   ).Metric(labels={}, buckets=LATENCY_BUCKETS_MS)
        self.request_latency = family("flux_request_latency_ms", "Request latency, start to image (ms)",
                                      histogram).Metric(labels={}, buckets=LATENCY_BUCKETS_MS)
        requests = family("flux_requests_total", "Requests by outcome", counter)
        self.outcomes = {o: requests.Metric(labels={"outcome": o})
                         for o in ("completed", "partial", "cancelled", "invalid", "failed")}
        self.steps = family("flux_steps_total", "Denoising steps run", counter).Metric(labels={})
        self.images = family("flux_images_total", "Images generated", counter).Metric(labels={})
        retries = family("flux_component_retries_total", "Component calls retried", counter)
        splits = family("flux_batch_splits_total", "Batches halved after out-of-memory", counter)
        self.retries = {m: retries.Metric(labels={"model": m}) for m in NETWORKS}
        self.splits = {m: splits.Metric(labels={"model": m}) for m in NETWORKS}
        self.gpu_memory = None
        if torch.cuda.is_available():
            self.gpu_memory = family("flux_gpu_memory_used_bytes", "GPU memory in use (device-wide)",
                                     pb_utils.MetricFamily.GAUGE).Metric(labels={"gpu": "0"})

    def sample_gpu_memory(self) -> None:
        if self.gpu_memory is not None:
            free, total = torch.cuda.mem_get_info()
            self.gpu_memory.set(total - free)


class BlsFluxModels:
    """`FluxModels` as BLS calls to the component models, for one client request."""

    def __init__(self, batched: dict[str, set[str]], policy: RetryPolicy, metrics: BlsMetrics,
                 on_gpu: bool):
        self.batched = batched
        self.policy = policy
        self.metrics = metrics
        self.stats = {m: RecoveryStats() for m in NETWORKS}
        self.request_kwargs = {}
        if on_gpu:
            self.request_kwargs["preferred_memory"] = pb_utils.PreferredMemory(
                pb_utils.TRITONSERVER_MEMORY_GPU, 0
            )

    async def _exec(self, model: str, inputs: list, outputs: list[str]) -> dict[str, torch.Tensor]:
        request = pb_utils.InferenceRequest(
            model_name=model, inputs=inputs, requested_output_names=outputs, **self.request_kwargs
        )
        began = time.perf_counter()
        response = await request.async_exec()
        self.metrics.component_latency[model].observe((time.perf_counter() - began) * 1000)
        if response.has_error():
            raise classify_failure(model, response.error().message())
        return {name: to_torch(pb_utils.get_output_tensor_by_name(response, name)) for name in outputs}

    async def _network(self, model: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        async def call(tensors):
            return await self._exec(
                model, [from_torch(pb_utils, n, v) for n, v in tensors.items()], [output]
            )

        stats = self.stats[model]
        retries, splits = stats.retries, stats.batch_splits
        try:
            result = await call_with_recovery(model, call, inputs, self.batched[model], self.policy, stats)
        finally:
            self.metrics.retries[model].increment(stats.retries - retries)
            self.metrics.splits[model].increment(stats.batch_splits - splits)
        return result[output]

    async def tokenize(self, prompts, prompts_2, max_sequence_length):
        inputs = [
            pb_utils.Tensor("prompt", np.array([p.encode() for p in prompts], dtype=object)),
            pb_utils.Tensor("prompt_2", np.array([p.encode() for p in prompts_2], dtype=object)),
            pb_utils.Tensor("max_sequence_length", np.array([max_sequence_length], dtype=np.int32)),
        ]
        ids = await self._exec("tokenizer", inputs, ["clip_input_ids", "t5_input_ids"])
        return ids["clip_input_ids"], ids["t5_input_ids"]

    async def clip_encoder(self, input_ids):
        return await self._network("clip_encoder", {"input_ids": input_ids}, "pooled_prompt_embeds")

    async def t5_encoder(self, input_ids):
        return await self._network("t5_encoder", {"input_ids": input_ids}, "prompt_embeds")

    async def dit_transformer(self, inputs):
        return await self._network("dit_transformer", inputs, "noise_pred")

    async def vae_decoder(self, latents):
        return await self._network("vae_decoder", {"latents": latents}, "image")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "flux_bls streams responses: set model_transaction_policy { decoupled: true }"
            )
        params = model_parameters(args)
        self.info = load_model_info(params["model_dir"])
        self.limits = ServingLimits(**{
            name: int(params[name]) for name in ServingLimits.__dataclass_fields__ if name in params
        })
        self.policy = RetryPolicy(
            attempts=int(params.get("retry_attempts", RetryPolicy.attempts)),
            backoff_s=float(params.get("retry_backoff_ms", RetryPolicy.backoff_s * 1000)) / 1000,
        )
        self.input_names = [spec.name for spec in bls_spec(self.info).inputs]
        specs = component_specs(self.info)
        self.batched = {m: specs[m].batched_inputs() for m in NETWORKS}
        self.on_gpu = instance_device(args) != "cpu"
        self.metrics = BlsMetrics()

    async def execute(self, requests):
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    def _read_inputs(self, request) -> dict:
        raw = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                raw[name] = tensor.as_numpy()
        return raw

    async def _serve(self, request) -> None:
        sender = request.get_response_sender()
        began = time.monotonic()
        try:
            gen_request = validate_request(self._read_inputs(request), self.info, self.limits)
        except InvalidRequest as exc:
            sender.send(error_response(pb_utils, f"flux_bls: {exc}", "INVALID_ARG"), flags=FINAL)
            self.metrics.outcomes["invalid"].increment(1)
            return
        deadline = None if gen_request.deadline_ms is None else began + gen_request.deadline_ms / 1000

        def stop_check():
            if request.is_cancelled():
                return "cancelled"
            if deadline is not None and time.monotonic() >= deadline:
                return "deadline"
            return None

        models = BlsFluxModels(self.batched, self.policy, self.metrics, self.on_gpu)
        outcome = "cancelled"
        try:
            async for event in generate(gen_request, self.info, models, stop_check):
                self.metrics.sample_gpu_memory()
                if isinstance(event, FinalImage):
                    outcome = "partial" if event.partial else "completed"
                    self._send_image(sender, event, models)
                    self.metrics.request_latency.observe((time.monotonic() - began) * 1000)
                    self.metrics.images.increment(event.image.shape[0])
                else:
                    self.metrics.steps.increment(1)
                    self.metrics.step_latency.observe(event.seconds * 1000)
                    outputs = [
                        pb_utils.Tensor("step", np.array([event.step], dtype=np.int32)),
                        pb_utils.Tensor("total_steps", np.array([event.total_steps], dtype=np.int32)),
                        pb_utils.Tensor("timestep", np.array([event.timestep], dtype=np.float32)),
                    ]
                    if event.preview_latent is not None:
                        outputs.append(from_torch(pb_utils, "preview_latent", event.preview_latent))
                    sender.send(pb_utils.InferenceResponse(outputs))
            self.metrics.outcomes[outcome].increment(1)
            sender.send(flags=FINAL)
        except StageFailed as exc:
            sender.send(error_response(pb_utils, f"flux_bls: {exc}", "UNAVAILABLE"), flags=FINAL)
            self.metrics.outcomes["failed"].increment(1)
        except Exception as exc:  # the stream must always end, or the request is lost
            sender.send(error_response(pb_utils, f"flux_bls: {type(exc).__name__}: {exc}"),
                        flags=FINAL)
            self.metrics.outcomes["failed"].increment(1)

    @staticmethod
    def _send_image(sender, event: FinalImage, models: BlsFluxModels) -> None:
        timings = event.timings.spans_ms()
        recovery = {m: vars(s) for m, s in models.stats.items() if s.retries or s.batch_splits}
        report = json.dumps(dict(timings, **({"recovery": recovery} if recovery else {})))
        sender.send(pb_utils.InferenceResponse([
            from_torch(pb_utils, "image", event.image),
            pb_utils.Tensor("seed", np.array([event.seed], dtype=np.int64)),
            pb_utils.Tensor("timings", np.array([report.encode()], dtype=object)),
            pb_utils.Tensor("steps_completed", np.array([event.steps_completed], dtype=np.int32)),
            pb_utils.Tensor("partial", np.array([event.partial], dtype=bool)),
        ]))
