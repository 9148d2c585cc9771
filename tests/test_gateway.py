"""The HTTP gateway against the real Triton server with the trained shapes model: OpenAI's request
and response shapes, Server-Sent Events previews, disconnects that stop the loop, errors as HTTP."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from flux_triton.server.launcher import free_port
from gateway.app import GatewaySettings, GenerationRequest
from tests.gateway_server import RunningGateway, sse_events
from tests.reference import metric, served_generate

PROMPT = "a red circle on a blue background"


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def gateway(served_shapes):
    with RunningGateway(GatewaySettings(triton_url=served_shapes.url)) as running:
        yield running


def _stream(gateway, body: dict, stop_after: int | None = None):
    connection = gateway.connection()
    connection.request("POST", "/v1/images/generations", body=json.dumps(dict(body, stream=True)),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("content-type").startswith("text/event-stream")
    events = list(sse_events(response, stop_after))
    return events, connection


def test_generation_is_the_served_image(gateway, served_shapes):
    status, body, _ = gateway.post("/v1/images/generations",
                                   {"prompt": PROMPT, "size": "128x128", "seed": 3, "n": 2})
    assert status == 200, body
    assert [set(d) for d in body["data"]] == [{"b64_json"}, {"b64_json"}]
    assert body["seed"] == 3 and body["partial"] is False and "vae_decoder" in body["timings"]
    reference = served_generate(served_shapes, dict(prompt=PROMPT, height=128, width=128, seed=3,
                                                    num_images_per_prompt=2))
    for item, expected in zip(body["data"], reference.image):
        assert np.array_equal(_image(item["b64_json"]), expected)  # PNG is lossless


def test_stream_sends_a_preview_per_step_then_the_image(gateway, served_shapes):
    began = time.perf_counter()
    events, connection = _stream(gateway, {"prompt": PROMPT, "seed": 0, "steps": 6})
    connection.close()
    names = [name for name, _, _ in events]
    assert names == ["image_generation.partial_image"] * 6 + ["image_generation.completed"]
    partials = [data for _, data, _ in events[:-1]]
    assert [p["partial_image_index"] for p in partials] == list(range(6))
    assert [p["step"] for p in partials] == list(range(1, 7))
    assert all(p["total_steps"] == 6 and p["step_ms"] >= 0 and p["b64_json"] for p in partials)
    previews = [_image(p["b64_json"]) for p in partials]
    assert previews[0].shape == (128, 128, 3)  # decoded by the server's VAE, full size
    final = events[-1][1]
    assert final["type"] == "image_generation.completed" and final["seed"] == 0
    image = _image(final["b64_json"])
    # x0 previews approach the image step by step, and the last one is almost it
    distances = [float(np.abs(p.astype(int) - image).mean()) for p in previews]
    assert distances[-1] < 6 and distances[-1] < distances[0]
    first_http = events[0][2]
    grpc = served_generate(served_shapes, dict(prompt=PROMPT, seed=0, num_inference_steps=6))
    print(f"\nfirst partial image over HTTP after {first_http * 1000:.0f} ms (gRPC: first step "
          f"after {grpc.first_response_s * 1000:.0f} ms); whole request {time.perf_counter() - began:.2f} s;"
          f" preview distance to the image by step: {[round(d, 1) for d in distances]}")


def test_latent_previews_on_request(gateway):
    events, connection = _stream(gateway, {"prompt": PROMPT, "seed": 1, "steps": 3,
                                           "preview": "latent"})
    connection.close()
    assert [n for n, _, _ in events].count("image_generation.partial_image") == 3
    events, connection = _stream(gateway, {"prompt": PROMPT, "seed": 1, "steps": 3,
                                           "preview": "none"})
    connection.close()
    partials = [d for n, d, _ in events if n == "image_generation.partial_image"]
    assert len(partials) == 3 and not any("b64_json" in p for p in partials)


def test_disconnect_stops_the_loop(gateway, served_shapes):
    steps_before = metric(served_shapes, "flux_steps_total")
    cancelled_before = metric(served_shapes, "flux_requests_total", outcome="cancelled")
    events, connection = _stream(gateway, {"prompt": PROMPT, "seed": 2, "steps": 100}, stop_after=2)
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    at_disconnect = metric(served_shapes, "flux_steps_total") - steps_before
    deadline = time.time() + 30
    while metric(served_shapes, "flux_requests_total", outcome="cancelled") == cancelled_before:
        assert time.time() < deadline, "the server never noticed the disconnect"
        time.sleep(0.1)
    steps_run = metric(served_shapes, "flux_steps_total") - steps_before
    time.sleep(0.5)
    assert metric(served_shapes, "flux_steps_total") - steps_before == steps_run  # and it stays so
    print(f"\ndisconnected after 2 partial images: {at_disconnect:.0f} steps done by then, "
          f"{steps_run - at_disconnect:.0f} more after it, {steps_run:.0f} of 100 in all")
    assert steps_run - at_disconnect <= 3  # the step in flight, then the loop stopped
    assert steps_run < 50


def test_invalid_fields_are_400_naming_the_field(gateway):
    status, body, _ = gateway.post("/v1/images/generations", {"prompt": PROMPT, "size": "100x100"})
    assert status == 400 and body["error"]["param"] == "size", body
    assert "multiple of 16" in body["error"]["message"]
    status, body, _ = gateway.post("/v1/images/generations", {"prompt": PROMPT, "n": 0})
    assert status == 400 and body["error"]["param"] == "n"
    status, body, _ = gateway.post("/v1/images/generations", {"prompt": PROMPT, "size": "big"})
    assert status == 400 and body["error"]["param"] == "size"
    status, body, _ = gateway.post("/v1/images/generations", {"prompt": PROMPT, "bogus": 1})
    assert status == 400 and body["error"]["param"] == "bogus"
    status, body, _ = gateway.post("/v1/images/generations",
                                   {"prompt": PROMPT, "response_format": "url"})
    assert status == 400 and body["error"]["param"] == "response_format"
    status, body, _ = gateway.post("/v1/images/generations", {"prompt": PROMPT, "steps": 500})
    assert status == 400 and body["error"]["param"] == "steps" and "[1, 100]" in body["error"]["message"]


def test_deadline_returns_the_partial_image_marked(gateway):
    status, body, _ = gateway.post("/v1/images/generations",
                                   {"prompt": PROMPT, "steps": 100, "deadline_ms": 300, "seed": 4})
    assert status == 200, body
    assert body["partial"] is True and body["steps_completed"] < 100 and body["data"]


def test_health_reflects_triton(gateway):
    status, payload, _ = gateway.get("/healthz")
    assert status == 200 and json.loads(payload)["status"] == "ready"
    with RunningGateway(GatewaySettings(triton_url=f"127.0.0.1:{free_port()}")) as orphan:
        status, payload, _ = orphan.get("/healthz")
        assert status == 503
        status, body, _ = orphan.post("/v1/images/generations", {"prompt": PROMPT})
        assert status == 503 and body["error"]["type"] == "server_error"


def test_page_is_served(gateway):
    status, payload, headers = gateway.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/v1/images/generations" in payload


@pytest.mark.fast
def test_bearer_token_body_limit_and_cors(served_shapes):
    settings = GatewaySettings(triton_url="127.0.0.1:1", api_key="s3cret", max_body_bytes=200)
    with RunningGateway(settings) as guarded:
        status, body, _ = guarded.post("/v1/images/generations", {"prompt": PROMPT})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body, _ = guarded.post("/v1/images/generations", {"prompt": "x" * 500},
                                       headers={"Authorization": "Bearer s3cret"})
        assert status == 413
        _, _, headers = guarded.get("/healthz", headers={"Origin": "https://example.com"})
        assert "access-control-allow-origin" not in {k.lower() for k in headers}
    with RunningGateway(GatewaySettings(triton_url="127.0.0.1:1",
                                        cors_origins=("https://example.com",))) as open_gateway:
        _, _, headers = open_gateway.get("/healthz", headers={"Origin": "https://example.com"})
        assert {k.lower(): v for k, v in headers.items()}["access-control-allow-origin"] == \
            "https://example.com"


@pytest.mark.fast
def test_openai_fields_map_to_flux_bls_inputs():
    request = GenerationRequest(prompt="a cat", n=2, size="96x64", steps=3, seed=1, preview="x0")
    fields = request.bls_fields()
    assert (fields["width"], fields["height"], fields["num_images_per_prompt"]) == (96, 64, 2)
    assert fields["num_inference_steps"] == 3 and fields["preview_kind"] == "x0"
    assert GenerationRequest(prompt="a cat", preview="none").bls_fields()["previews"] is False
