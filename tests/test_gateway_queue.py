"""The gateway's line: API keys served in turn (one client's burst cannot starve another), places
streamed as `image_generation.queued`, and a full queue answered 429 with Retry-After at once."""

from __future__ import annotations

import json
import threading
import time

import pytest

from flux_triton.errors import RESOURCE_EXHAUSTED, retry_after_text, tag_status
from flux_triton.gateway.app import GatewaySettings, triton_error
from tests.gateway_server import RunningGateway, sse_events

PROMPT = "a red circle on a blue background"
ALICE, BOB = "alice-key", "bob-key"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.fast
def test_a_full_server_queue_is_429_with_retry_after():
    message = tag_status(RESOURCE_EXHAUSTED, f"flux_bls: the queue is full; {retry_after_text(7)}")
    error = triton_error(message)
    assert (error.status, error.code, error.headers) == (429, "queue_full", {"Retry-After": "7"})


def test_api_keys_take_turns_and_a_full_line_is_refused_at_once(served_shapes):
    settings = GatewaySettings(triton_url=served_shapes.url, api_key=f"{ALICE}, {BOB}",
                               max_inflight=1, max_queue=4)
    finished: list[tuple[str, float]] = []
    lock = threading.Lock()

    with RunningGateway(settings) as gateway:
        def generate(who: str, key: str, seed: int) -> None:
            status, body, _ = gateway.post("/v1/images/generations",
                                           {"prompt": PROMPT, "seed": seed, "steps": 24}, bearer(key))
            assert status == 200, body
            with lock:
                finished.append((who, time.perf_counter()))

        burst = [threading.Thread(target=generate, args=(f"alice{i}", ALICE, i)) for i in range(4)]
        for thread in burst:
            thread.start()
        time.sleep(0.3)  # alice's first runs, three wait
        connection = gateway.connection()
        connection.request("POST", "/v1/images/generations", headers={
            "Content-Type": "application/json", **bearer(BOB)},
            body=json.dumps({"prompt": PROMPT, "seed": 9, "steps": 24, "stream": True}))
        response = connection.getresponse()
        assert response.status == 200
        # the line holds alice's three and bob's one: four, the most; the next is refused at once
        time.sleep(0.1)
        began = time.perf_counter()
        status, body, headers = gateway.post("/v1/images/generations", {"prompt": PROMPT},
                                             bearer(ALICE))
        refused_ms = (time.perf_counter() - began) * 1000
        events = list(sse_events(response))
        with lock:
            finished.append(("bob", time.perf_counter()))
        connection.close()
        for thread in burst:
            thread.join(120)

    order = [who for who, _ in sorted(finished, key=lambda item: item[1])]
    places = [data["queue_position"] for name, data, _ in events if name == "image_generation.queued"]
    print(f"\ngateway line: finished {order}; bob's places {places}; refusal in {refused_ms:.0f} ms")
    assert status == 429 and body["error"]["code"] == "queue_full", body
    assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) >= 1 and refused_ms < 1000
    assert places and places[0] <= 2 and places == sorted(places, reverse=True) and places[-1] == 1
    assert [name for name, _, _ in events][-1] == "image_generation.completed"
    # first in, first out would finish bob last; in turn he is at most third
    assert order.index("bob") <= 2, order
