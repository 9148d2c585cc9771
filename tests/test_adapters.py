"""The Triton adapters run in-process against a stand-in for triton_python_backend_utils: the BLS
drives the component adapters exactly as tritonserver would route its requests."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flux_triton.adapters.backend import to_torch
from flux_triton.adapters.bls import CancellationWatch as CancellationWatch
from flux_triton.adapters.faults import InjectedUnavailable
from flux_triton.admission import QueueFull
from flux_triton.errors import reported_status
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.recovery import OutOfMemory, classify_failure
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import RetryPolicy
from flux_triton.specs import NETWORKS
from tests import python_backend_stub as pb
from tests.reference import raw_inputs

pytestmark = pytest.mark.fast
SMALL = dict(prompt="a red circle on a blue background", height=64, width=64, num_inference_steps=3,
             seed=7)


@pytest.fixture
def repository(model_dirs, tmp_path):
    """tokenizer, the four networks and flux_bls of the tiny schnell model, wired through `pb`."""
    yield pb.wire_repository(model_dirs["schnell"], tmp_path, retry=RetryPolicy(3, 0.001))
    pb.reset()


_request = pb.flux_bls_request


def _serve(bls, request) -> list[tuple]:
    pb.serve(bls, [request])
    assert request.sender.finished
    return request.sender.sent


def _outputs(response) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def test_bls_streams_the_in_process_pipeline(repository, model_dirs):
    sent = _serve(repository, _request(**SMALL))
    steps = [_outputs(r) for r, _ in sent if r is not None and "step" in _outputs(r)]
    image = next(_outputs(r) for r, _ in sent if r is not None and "image" in _outputs(r))
    assert [int(s["step"][0]) for s in steps] == [1, 2, 3]
    assert sent[-1] == (None, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    info = load_model_info(model_dirs["schnell"])
    events = list(run_in_process(validate_request(raw_inputs(**SMALL), info), info,
                                 TorchFluxModels(info)))
    expected = next(e for e in events if isinstance(e, FinalImage))
    assert np.array_equal(image["image"], expected.image.numpy())
    for step, event in zip(steps, events):
        assert np.array_equal(step["preview_latent"], event.preview_latent.numpy())
    assert int(image["seed"][0]) == 7 and not bool(image["partial"][0])
    outcomes = repository.metrics.outcomes
    assert outcomes["completed"].value == 1 and repository.metrics.steps.value == 3


def test_invalid_request_ends_with_invalid_arg(repository):
    sent = _serve(repository, _request(**dict(SMALL, height=100)))
    (response, flags), = sent
    assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert response.error().code() == pb.TritonError.INVALID_ARG
    assert "`height`" in response.error().message() and "multiple of 16" in response.error().message()
    assert repository.metrics.outcomes["invalid"].value == 1
    assert sum(pb.calls.values()) == 0  # rejected before any model ran


def test_a_request_is_accounted_for_before_its_final_response(repository):
    """A client that got its final response and sends its next request at once finds the first
    one gone from the active count, the line and the outcome metrics."""
    seen = []

    def at_final():
        seen.append((repository.metrics.active_requests.value, repository.admission.running,
                     sum(m.value for m in repository.metrics.outcomes.values())))

    for fields in (SMALL, dict(SMALL, height=100)):  # a generation, then an invalid request
        request = _request(**fields)
        request.sender.on_final = at_final
        _serve(repository, request)
    assert seen == [(0, 0, 1), (0, 0, 2)]


def test_concurrent_requests_share_the_send_lanes_in_order(repository, monkeypatch):
    """Twelve requests at once are sent from at most the eight lanes, each request's responses in
    order (steps 1..n, the image, the final flag)."""
    senders = {}
    send = pb.ResponseSender.send

    def recording(self, response=None, flags=0):
        senders.setdefault(id(self), set()).add(threading.get_ident())
        send(self, response, flags)

    monkeypatch.setattr(pb.ResponseSender, "send", recording)
    requests = [_request(**dict(SMALL, seed=i)) for i in range(12)]
    pb.serve(repository, requests)
    assert len(set().union(*senders.values())) <= 8
    assert all(len(threads) == 1 for threads in senders.values())  # one lane a request
    for request in requests:
        kinds = ["final" if r is None else next(iter(_outputs(r))) for r, _ in request.sender.sent]
        steps = [int(_outputs(r)["step"][0]) for r, _ in request.sender.sent
                 if r is not None and "step" in _outputs(r)]
        waited = kinds.count("queue_position")  # MAX_INFLIGHT 4: the others wait in line first
        assert kinds == ["queue_position"] * waited + ["step"] * 3 + ["image", "final"]
        assert steps == [1, 2, 3]


def test_only_a_true_list_loras_passes_a_full_queue(repository, monkeypatch):
    """A full queue refuses at once whatever a generation carries: `list_loras` false does not
    make it a listing. A true one (the supervisor's probe) is still answered."""
    monkeypatch.setattr(repository.admission, "refusal", lambda: QueueFull(2, 1))
    generation = _request(**SMALL, list_loras=np.array([False]))
    pb.serve(repository, [generation])
    assert "[RESOURCE_EXHAUSTED]" in _final_error(generation.sender.sent).message()
    assert sum(pb.calls.values()) == 0
    listing = _serve(repository, _request(list_loras=np.array([True])))
    assert "loras" in _outputs(listing[0][0])


def _final_error(sent):
    response, flags = sent[-1]
    assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL and response.has_error()
    return response.error()


def test_unavailable_is_retried(repository):
    pb.failures["dit_transformer"].extend(pb.TritonError("not ready", pb.TritonError.UNAVAILABLE)
                                          for _ in range(2))
    sent = _serve(repository, _request(**SMALL))
    image = next(_outputs(r) for r, _ in sent if r is not None and "image" in _outputs(r))
    assert '"dit_transformer": {"retries": 2' in image["timings"][0].decode()
    assert repository.metrics.retries["dit_transformer"].value == 2


def test_component_codes_survive_a_bls_hop_that_loses_them(repository, monkeypatch):
    """On Triton 2.51 the BLS sees INTERNAL for every error; the tag in the text keeps the code."""
    dit = pb.models["dit_transformer"]
    plan = [InjectedUnavailable("busy"), InjectedUnavailable("busy"), None]
    component = dit.component

    def flaky(**inputs):
        failure = plan.pop(0) if plan else None
        if failure:
            raise failure
        return component(**inputs)

    monkeypatch.setattr(dit, "component", flaky)
    sent = _serve(repository, _request(**SMALL))
    assert not sent[-2][0].has_error()
    assert repository.metrics.retries["dit_transformer"].value == 2

    plan[:] = [RuntimeError("bad weights")] * 3
    error = _final_error(_serve(repository, _request(**SMALL)))
    assert "[INTERNAL] dit_transformer: RuntimeError: bad weights" in error.message()
    assert repository.metrics.retries["dit_transformer"].value == 2 and len(plan) == 2


@pytest.mark.parametrize("code,message,expected", [
    ("UNAVAILABLE", "anything", "UNAVAILABLE"),
    ("INVALID_ARG", "anything", "INVALID_ARG"),
    ("INTERNAL", "t5_encoder: [UNAVAILABLE] restarting", "UNAVAILABLE"),
    ("INTERNAL", "vae_decoder: [INTERNAL] out of memory: ...", "INTERNAL"),
    ("INTERNAL", "Model 'dit_transformer' is not ready.", "UNAVAILABLE"),
    ("INTERNAL", "Stub process 'dit_transformer_0_0' is not healthy.", "UNAVAILABLE"),
    ("INTERNAL", "Request for unknown model: 'vae_decoder' has no available versions", "UNAVAILABLE"),
    ("INTERNAL", "RuntimeError: mat1 and mat2 shapes cannot be multiplied", "INTERNAL"),
    (None, "no code at all", None),
])
def test_reported_status(code, message, expected):
    assert reported_status(code, message) == expected


def test_classification_by_status():
    assert classify_failure("m", "x", "UNAVAILABLE").retryable
    assert not classify_failure("m", "x", "INTERNAL").retryable
    assert not classify_failure("m", "x", "INVALID_ARG").retryable
    assert isinstance(classify_failure("m", "[INTERNAL] out of memory", "INTERNAL"), OutOfMemory)
    assert isinstance(classify_failure("m", "CUDA out of memory", None), OutOfMemory)
    assert classify_failure("m", "connection reset", None).retryable  # no code: the text decides


def test_deterministic_internal_error_is_not_retried(repository):
    pb.failures["dit_transformer"].extend(pb.TritonError("shape mismatch", pb.TritonError.INTERNAL)
                                          for _ in range(3))
    error = _final_error(_serve(repository, _request(**SMALL)))
    assert "dit_transformer failed during step_1: shape mismatch" in error.message()
    assert "attempts" not in error.message()
    assert error.code() == pb.TritonError.INTERNAL
    assert pb.calls["dit_transformer"] == 1 and len(pb.failures["dit_transformer"]) == 2


def test_retries_exhausted_end_unavailable(repository):
    pb.failures["vae_decoder"].extend(pb.TritonError("restarting", pb.TritonError.UNAVAILABLE)
                                      for _ in range(5))
    error = _final_error(_serve(repository, _request(**SMALL)))
    assert "vae_decoder failed during vae_decoder: failed after 3 attempts" in error.message()
    assert error.code() == pb.TritonError.UNAVAILABLE and pb.calls["vae_decoder"] == 3


def test_internal_out_of_memory_halves_the_batch(repository):
    pb.failures["dit_transformer"].append(
        pb.TritonError("dit_transformer: out of memory: OutOfMemoryError: CUDA out of memory",
                       pb.TritonError.INTERNAL))
    sent = _serve(repository, _request(**dict(SMALL, num_images_per_prompt=2)))
    image = next(_outputs(r) for r, _ in sent if r is not None and "image" in _outputs(r))
    assert image["image"].shape == (2, 64, 64, 3)
    assert repository.metrics.splits["dit_transformer"].value == 1


def test_error_without_code_falls_back_to_its_text(repository):
    pb.failures["t5_encoder"].append(pb.TritonError("connection reset"))
    sent = _serve(repository, _request(**SMALL))
    assert not sent[-2][0].has_error()  # retried once, then the image
    assert repository.metrics.retries["t5_encoder"].value == 1


def test_cancelled_request_ends_after_the_step_in_flight(repository, monkeypatch):
    dit = pb.models["dit_transformer"]
    component = dit.component

    def slow(**inputs):  # steps far slower than a send, as on a real model
        time.sleep(0.05)
        return component(**inputs)

    monkeypatch.setattr(dit, "component", slow)
    request = _request(**dict(SMALL, num_inference_steps=6))
    request.cancel_after_steps = 2
    sent = _serve(repository, request)
    kinds = ["final" if r is None else next(iter(_outputs(r))) for r, _ in sent]
    # Triton is asked every 50 ms (CancellationWatch), and a step may be in flight: at most one
    # watch interval (a step here) and the step in flight pass
    assert kinds in [["step"] * n + ["final"] for n in (2, 3, 4)], kinds
    assert repository.metrics.outcomes["cancelled"].value == 1


def test_the_cancellation_watch_asks_each_request_until_forgotten():
    """Triton is asked about a watched request from the watch's thread, never after `forget`
    returns (Triton releases a request after its final response)."""
    asked: list[str] = []

    class Request:
        def __init__(self, name, cancelled_after):
            self.name, self.cancelled_after, self.forgotten = name, cancelled_after, False

        def is_cancelled(self):
            assert not self.forgotten, "asked after forget"
            asked.append(self.name)
            return asked.count(self.name) >= self.cancelled_after

    watch = CancellationWatch(interval_s=0.001)
    kept, dropped = Request("kept", 3), Request("dropped", 10**9)
    kept_flag, dropped_flag = watch.watch(kept), watch.watch(dropped)
    assert kept_flag.wait(5) and not dropped_flag.is_set()
    watch.forget(dropped)
    dropped.forgotten = True
    count = len(asked)
    time.sleep(0.05)
    assert "dropped" not in asked[count:]
    watch.close()


def test_component_reports_out_of_memory_as_internal_with_marker(repository, monkeypatch):
    vae = pb.models["vae_decoder"]

    def out_of_memory(**inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(vae, "component", out_of_memory)
    request = pb.InferenceRequest("vae_decoder", [pb.Tensor("latents", torch.zeros(1, 16, 8, 8))])
    response, = vae.execute([request])
    assert response.error().code() == pb.TritonError.INTERNAL
    assert response.error().message().startswith(
        "[INTERNAL] vae_decoder: out of memory: OutOfMemoryError")


def test_component_failure_is_one_requests_alone(repository):
    dit = pb.models["vae_decoder"]
    good = pb.InferenceRequest("vae_decoder", [pb.Tensor("latents", torch.randn(1, 16, 8, 8))])
    bad = pb.InferenceRequest("vae_decoder", [pb.Tensor("latents", torch.randn(1, 3, 8, 8))])
    responses = dit.execute([bad, good])
    assert responses[0].has_error() and responses[0].error().code() == pb.TritonError.INTERNAL
    assert not responses[1].has_error()


def test_tokenizer_rejects_sequence_length_as_invalid_arg(repository):
    tokenizer = pb.models["tokenizer"]
    request = pb.InferenceRequest("tokenizer", [
        pb.Tensor("prompt", np.array([b"a cat"], dtype=object)),
        pb.Tensor("prompt_2", np.array([b"a cat"], dtype=object)),
        pb.Tensor("max_sequence_length", np.array([9999], dtype=np.int32)),
    ])
    response, = tokenizer.execute([request])
    assert response.error().code() == pb.TritonError.INVALID_ARG
    assert "`max_sequence_length` must be in [1, " in response.error().message()


def test_each_network_input_gets_the_type_its_spec_declares(model_dirs, tmp_path):
    """A bf16 dev DiT takes its latents and embeddings in bf16 but guidance in float32 (the spec
    says so, and tritonserver rejects any other type): the BLS casts input by input."""
    types = dict.fromkeys(NETWORKS, "BF16")
    bls = pb.wire_repository(model_dirs["dev"], tmp_path, precision="BF16", component_dtypes=types)
    try:
        sent = _serve(bls, _request(**dict(SMALL, num_inference_steps=2, guidance_scale=3.5)))
        assert sent[-1] == (None, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        assert not any(r is not None and r.has_error() for r, _ in sent)
        dit_calls = [r for r in pb.requested if r.model_name == "dit_transformer"]
        assert len(dit_calls) == 2
        for call in dit_calls:
            sent_types = {name: to_torch(t).dtype for name, t in call.inputs.items()}
            assert sent_types["guidance"] == torch.float32
            assert sent_types["hidden_states"] == sent_types["timestep"] == torch.bfloat16
    finally:
        pb.reset()


@pytest.mark.parametrize("pair", [("clip_encoder", "t5_encoder"), ("tokenizer", "tokenizer")])
def test_bls_runs_clip_and_t5_at_once(repository, monkeypatch, pair):
    """CLIP and T5 (and the positive and negative prompt's tokenizer calls) are in flight together:
    each call of the pair waits until the other one has started. Called one after the other, the
    first would wait in vain and the request fail."""
    waiting: list[str] = []
    both = asyncio.Event()
    served = pb.InferenceRequest.async_exec

    async def rendezvous(request):
        if request.model_name in pair and not both.is_set():
            waiting.append(request.model_name)
            if len(waiting) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), timeout=5)
        return await served(request)

    monkeypatch.setattr(pb.InferenceRequest, "async_exec", rendezvous)
    sent = _serve(repository, _request(**dict(SMALL, negative_prompt="blurry", true_cfg_scale=2.0)))
    errors = [r.error().message() for r, _ in sent if r is not None and r.has_error()]
    assert errors == [] and sorted(waiting) == sorted(pair)


def test_metric_updates_are_applied_in_order_off_the_caller_and_flushed():
    """BlsMetrics' updates go to Triton from the writer's thread, in order; an increment by 0 is
    no update; a failing update is reported and the others go on; `flush` waits for them."""
    from flux_triton.adapters.metrics import BlsMetrics

    applied, errors = [], []
    caller = threading.get_ident()

    class Metric:
        def __init__(self, name):
            self.name = name

        def increment(self, value):
            assert threading.get_ident() != caller
            if value < 0:
                raise ValueError("a counter only goes up")
            applied.append((self.name, value))

        def set(self, value):
            applied.append((self.name, value))

        observe = set

    class Family:
        HISTOGRAM = COUNTER = GAUGE = "kind"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, **options):  # noqa: N802
            return Metric(self.name)

    metrics = BlsMetrics(SimpleNamespace(MetricFamily=Family), on_error=errors.append)
    metrics.steps.increment(1)
    metrics.retries["dit_transformer"].increment(0)
    metrics.images.increment(-1)
    for length in (3, 2, 0):
        metrics.queue_length.set(length)
    assert metrics.flush()
    # the gauge's values in order, or only its last where the writer took them at once
    assert applied[0] == ("flux_steps_total", 1)
    assert applied[1:] in ([("flux_queue_length", v) for v in (3, 2, 0)], [("flux_queue_length", 0)])
    assert len(errors) == 1 and "increment(-1)" in errors[0]
    metrics.close()


@pytest.mark.parametrize("coalesce", [True, False])
def test_the_metric_writer_coalesces_what_queued_up_meanwhile(coalesce):
    """Updates that queue up while the writer is busy reach Triton with the same totals, in one
    increment per counter and the last value per gauge (every observation stays one)."""
    from flux_triton.adapters.metrics import MetricWriter

    entered, release, calls = threading.Event(), threading.Event(), []

    class Metric:
        def __init__(self, name):
            self.name = name

        def increment(self, value):
            if self.name == "blocker":  # the writer is busy while the rest queues up
                entered.set()
                release.wait(10)
            calls.append((self.name, "increment", value))

        def set(self, value):
            calls.append((self.name, "set", value))

        def observe(self, value):
            calls.append((self.name, "observe", value))

    writer = MetricWriter(coalesce=coalesce)
    counter, gauge, histogram = Metric("steps"), Metric("queue"), Metric("latency")
    writer.put(Metric("blocker"), "increment", 1)
    assert entered.wait(10)
    for i in range(100):
        writer.put(counter, "increment", 1)
        writer.put(gauge, "set", i)
        if i % 10 == 0:
            writer.put(histogram, "observe", float(i))
    release.set()
    assert writer.flush()
    writer.close()
    assert sum(v for name, _, v in calls if name == "steps") == 100
    assert [v for name, _, v in calls if name == "queue"][-1] == 99
    assert [v for name, _, v in calls if name == "latency"] == [float(i) for i in range(0, 100, 10)]
    assert writer.applied == len(calls) == (1 + 1 + 1 + 10 if coalesce else 1 + 100 + 100 + 10)
