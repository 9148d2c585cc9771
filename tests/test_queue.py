"""A bounded queue on a real server (MAX_INFLIGHT=1 from the export, MAX_QUEUE=2 from the serving
environment): first in, first out, places streamed, refusals at once and for free, and requests
that leave the line while they wait."""

from __future__ import annotations

import queue
import threading
import time
from functools import partial

import numpy as np
import pytest

from flux_triton.clients.stream_client import build_inputs, queue_response, stream_generate
from flux_triton.errors import client_error_kind, retry_after_s
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import MAX_QUEUE_ENV
from tests.conftest import _serve_variants
from tests.reference import inject, metric, raw_inputs, served_generate

STEP_DELAY_MS = 400  # every DiT call, so the one running request holds the line


@pytest.fixture(scope="module")
def served_queue(model_dirs, tmp_path_factory):
    from flux_triton.adapters.faults import FAULTS_ENV

    fault_dir = tmp_path_factory.mktemp("queue-faults")
    for servers in _serve_variants(model_dirs, tmp_path_factory, "torch", ("schnell",),
                                   env={FAULTS_ENV: str(fault_dir), MAX_QUEUE_ENV: "2"},
                                   max_inflight=1):
        srv = servers["schnell"]
        srv.fault_dir = fault_dir
        yield srv
        for plan in fault_dir.glob("*.json"):
            plan.unlink()


def fields(seed: int, **more) -> dict:
    return dict(prompt=f"a queue of {seed} red circles", height=64, width=64,
                num_inference_steps=4, seed=seed, **more)


def in_background(srv, request: dict, until=None) -> tuple[threading.Thread, list]:
    """A generation on its own thread and connection; returns once `until` (a function of the
    event, "step" or a place in line) said True of one, if given."""
    out, reached = [], threading.Event()

    def generate():
        client = srv.client()
        try:
            out.append(stream_generate(
                client, build_inputs(**request),
                on_step=lambda step: until and until("step") and reached.set(),
                on_queue=lambda place: until and until(place) and reached.set()))
        finally:
            reached.set()
            client.close()

    thread = threading.Thread(target=generate)
    thread.start()
    if until is not None:
        assert reached.wait(30)
    return thread, out


def tokenizer_calls(srv) -> float:
    return metric(srv, "flux_component_latency_ms_count", model="tokenizer")


def test_waiting_requests_hear_their_place_and_run_in_order_past_the_bound_one_is_refused(served_queue):
    srv = served_queue
    inject(srv, "dit_transformer", delay_ms=STEP_DELAY_MS)
    refusals, waits = metric(srv, "flux_queue_refusals_total"), metric(srv, "flux_queue_wait_ms_count")
    calls = tokenizer_calls(srv)
    running = in_background(srv, fields(1), until=lambda event: event == "step")
    second = in_background(srv, fields(2), until=lambda event: event == 1)
    third = in_background(srv, fields(3), until=lambda event: event == 2)
    began = time.perf_counter()
    refused = served_generate(srv, fields(4))
    refused_ms = (time.perf_counter() - began) * 1000
    # the queue is full, but a listing (what the supervisor probes the BLS with) is still answered
    client = srv.client()
    try:
        listing = stream_generate(client, build_inputs(list_loras=True))
    finally:
        client.close()
    for thread, _ in (running, second, third):
        thread.join(timeout=60)
    results = [out[0] for _, out in (running, second, third)]

    print(f"\nqueue: places {[r.queue_positions for r in results]}, refusal answered in "
          f"{refused_ms:.0f} ms: {refused.error}")
    assert client_error_kind(refused.error) == "resource_exhausted", refused.error
    assert listing.error is None and listing.loras is not None
    assert "MAX_QUEUE=2" in refused.error and retry_after_s(refused.error) >= 1
    assert refused.steps == [] and tokenizer_calls(srv) == calls + 3  # none for the refused one
    assert refused_ms < 1000
    assert [r.queue_positions for r in results] == [[], [1], [2, 1]]
    assert all(r.error is None for r in results)
    finished = [r.total_s for r in results]
    models = TorchFluxModels(srv.info)
    for seed, result in zip((1, 2, 3), results):
        request = validate_request(raw_inputs(**fields(seed)), srv.info)
        expected = list(run_in_process(request, srv.info, models))[-1].image.numpy()
        assert np.array_equal(result.image, expected), f"seed {seed}"
    assert finished[1] > 0.5 * finished[0]  # it waited for the first to end
    assert metric(srv, "flux_queue_refusals_total") == refusals + 1
    assert metric(srv, "flux_queue_wait_ms_count") == waits + 3
    assert metric(srv, "flux_queue_length") == 0


def test_a_request_cancelled_or_out_of_time_in_line_leaves_it_without_a_model_call(served_queue):
    srv = served_queue
    inject(srv, "dit_transformer", delay_ms=STEP_DELAY_MS)
    running = in_background(srv, fields(5), until=lambda event: event == "step")
    calls = tokenizer_calls(srv)

    client, responses = srv.client(), queue.Queue()
    client.start_stream(callback=partial(queue_response, responses))
    client.async_stream_infer("flux_bls", build_inputs(**fields(6)), enable_empty_final_response=True)
    result, error = responses.get(timeout=30)
    assert error is None and result.as_numpy("queue_position").tolist() == [1]
    behind = in_background(srv, fields(7), until=lambda event: event == 2)
    client.stop_stream(cancel_requests=True)  # the client leaves the line
    client.close()
    waited = time.monotonic()
    while metric(srv, "flux_queue_length") != 1:  # the server sees it go
        assert time.monotonic() - waited < 10
        time.sleep(0.02)
    late = served_generate(srv, fields(8, deadline_ms=200))
    running[0].join(timeout=60)
    behind[0].join(timeout=60)

    assert behind[1][0].error is None and behind[1][0].queue_positions[:2] == [2, 1]
    assert client_error_kind(late.error) == "unavailable" and "`deadline_ms`" in late.error, late.error
    # the cancelled and the late one never reached a model: only seeds 7's prompt was tokenized
    assert tokenizer_calls(srv) == calls + 1
    assert srv.server.is_ready() and metric(srv, "flux_queue_length") == 0


def test_without_waiting_nothing_changes(served_queue):
    """A request that finds the GPU free streams exactly as before: no place in line."""
    srv = served_queue
    for plan in srv.fault_dir.glob("*.json"):
        plan.unlink()
    result = stream_generate(srv.client(), build_inputs(**fields(9)))
    assert result.error is None and result.queue_positions == [] and len(result.steps) == 4
