"""`POST /v1/images/edits` against real Triton servers: OpenAI's multipart form becomes flux_bls's
image inputs (the image equals the gRPC request's, bit for bit), streamed with partial images;
every bad input and hostile file is a 400 in OpenAI's shape naming the field, and the server keeps
serving. The shared file decoding (`flux_triton.clients.image_files`) and its mask conventions."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flux_triton.clients.image_files import ImageFileError, decode_image, decode_mask, edit_inputs
from flux_triton.gateway.app import GatewaySettings, partial_image_steps
from tests.gateway_server import RunningGateway, b64_image, multipart, sse_events
from tests.reference import served_generate

PROMPT = "a red circle on a blue background"


def shapes_picture(size: int = 128) -> np.ndarray:
    """A green square on a yellow background, the shapes model's kind of picture."""
    picture = Image.new("RGB", (size, size), (230, 210, 40))
    ImageDraw.Draw(picture).rectangle([size // 4, size // 4, size * 3 // 4, size * 3 // 4],
                                      fill=(30, 160, 60))
    return np.asarray(picture)


def noisy_picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: height * 3 // 4, width // 8: width // 2] = 255
    return mask


def png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring width x height RGB pixels, with one row of data: what a
    decompression bomb looks like before decoding (nothing of its size is ever allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * (3 * min(width, 4096) + 1)))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def schnell_gateway(served):
    with RunningGateway(GatewaySettings(triton_url=served["schnell"].url)) as running:
        yield running


def _edit(gateway, fields: dict, image: bytes | None, mask: bytes | None = None,
          image_field: str = "image"):
    files = ([(image_field, "image.png", image)] if image is not None else []) + \
        ([("mask", "mask.png", mask)] if mask is not None else [])
    return gateway.post_form("/v1/images/edits", fields, files)


# -- the image equals flux_bls's over gRPC ---------------------------------------------------------

def test_image_to_image_and_inpainting_are_the_served_images(gateway, served_shapes):
    source, mask = shapes_picture(), box_mask(128, 128)
    cases = {
        "image-to-image": (dict(strength=0.7), None),
        "inpainting": (dict(strength=0.9), mask),
    }
    for label, (extra, mask_array) in cases.items():
        status, body, _ = _edit(gateway, dict(prompt=PROMPT, seed=5, steps=8, n=2, **extra), png(source),
                                png(mask_array) if mask_array is not None else None)
        assert status == 200, (label, body)
        assert body["seed"] == 5 and len(body["data"]) == 2 and body["partial"] is False
        reference = served_generate(served_shapes, dict(
            prompt=PROMPT, seed=5, num_inference_steps=8, num_images_per_prompt=2, image=source,
            mask=mask_array, **extra))
        assert reference.error is None, reference.error
        for item, expected in zip(body["data"], reference.image):
            assert np.array_equal(b64_image(item["b64_json"]), expected), label
        changed = np.abs(b64_image(body["data"][0]["b64_json"]).astype(int) - source).mean(-1) > 40
        if mask_array is not None:  # inpainting repaints the box and keeps the rest, nearly
            print(f"\ninpainting: {changed[mask_array == 255].mean():.0%} of the box changed, "
                  f"{changed[mask_array == 0].mean():.0%} outside it")
            assert changed[mask_array == 0].mean() < changed[mask_array == 255].mean()


def test_openai_rgba_mask_is_transparent_where_to_repaint(schnell_gateway, served):
    """An OpenAI mask (RGBA, alpha 0 = edit) through `image[]`, on the tiny schnell model: the
    same image as the gRPC request with the 255-repaint mask, and the same as an L mask."""
    source, mask = noisy_picture(64, 96, 1), box_mask(64, 96)
    rgba = np.dstack([np.full((64, 96, 3), 200, np.uint8), 255 - mask])  # transparent in the box
    fields = dict(prompt="a cat", seed=2, steps=4, strength=0.8, size="auto")
    status, body, _ = _edit(schnell_gateway, fields, png(source), png(rgba, "RGBA"), "image[]")
    assert status == 200, body
    reference = served_generate(served["schnell"], dict(prompt="a cat", seed=2, num_inference_steps=4,
                                                        strength=0.8, image=source, mask=mask))
    assert np.array_equal(b64_image(body["data"][0]["b64_json"]), reference.image[0])
    status, grey, _ = _edit(schnell_gateway, fields, png(source), png(mask, "L"))
    assert status == 200 and grey["data"] == body["data"]


def test_kontext_reference_edit_is_the_served_image(served_kontext):
    source = noisy_picture(100, 70, 3)
    with RunningGateway(GatewaySettings(triton_url=served_kontext.url)) as gw:
        status, body, _ = _edit(gw, dict(prompt="make it red", seed=3, steps=2,
                                         image_role="reference"), png(source))
        assert status == 200, body
        refused, answer, _ = _edit(gw, dict(prompt="a", image_role="reference", strength=0.5),
                                   png(source))
    reference = served_generate(served_kontext, dict(prompt="make it red", seed=3, num_inference_steps=2,
                                                     image=source, image_role="reference"))
    assert np.array_equal(b64_image(body["data"][0]["b64_json"]), reference.image[0])
    assert refused == 400 and answer["error"]["param"] == "strength", answer


def _stream(gateway, fields: dict, image: bytes) -> list[tuple[str, dict]]:
    body, content_type = multipart(dict(fields, stream="true"), [("image", "a.png", image)])
    connection = gateway.connection()
    connection.request("POST", "/v1/images/edits", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("content-type").startswith("text/event-stream")
    events = [(name, data) for name, data, _ in sse_events(response)]
    connection.close()
    return events


def test_stream_sends_partial_images_then_the_edit(gateway, served_shapes):
    source = shapes_picture()
    fields = dict(prompt=PROMPT, seed=4, steps=10, strength=0.6)
    events = _stream(gateway, fields, png(source))
    names = [name for name, _ in events]
    partials = [data for _, data in events[:-1]]
    total = partials[0]["total_steps"]  # int(10 - 10 * 0.6 in FP32) = 3: steps 4 to 10 run
    assert total == 7 and names == ["image_generation.partial_image"] * total + [
        "image_generation.completed"], names
    assert [p["step"] for p in partials] == list(range(1, total + 1))
    assert all(b64_image(p["b64_json"]).shape == (128, 128, 3) for p in partials)
    image = b64_image(events[-1][1]["b64_json"])
    reference = served_generate(served_shapes, dict(prompt=PROMPT, seed=4, num_inference_steps=10,
                                                    strength=0.6, image=source))
    assert np.array_equal(image, reference.image[0])
    # the first x0 preview already shows the image it started from, not noise
    first = b64_image(partials[0]["b64_json"]).astype(int)
    assert np.abs(first - source).mean() < np.abs(first - source[::-1, ::-1]).mean()

    two = _stream(gateway, dict(fields, partial_images=2), png(source))
    assert [(n, d.get("step")) for n, d in two] == [
        ("image_generation.partial_image", -(-total // 2)), ("image_generation.partial_image", total),
        ("image_generation.completed", None)]
    assert [d["partial_image_index"] for _, d in two[:2]] == [0, 1]
    none = _stream(gateway, dict(fields, partial_images=0), png(source))
    assert [n for n, _ in none] == ["image_generation.completed"]
    assert np.array_equal(b64_image(two[-1][1]["b64_json"]), image)
    assert np.array_equal(b64_image(none[-1][1]["b64_json"]), image)


def test_generations_take_partial_images_too(gateway):
    events = _stream_generation(gateway, {"prompt": PROMPT, "seed": 0, "steps": 5, "partial_images": 3})
    assert [d.get("step") for _, d in events] == [2, 4, 5, None]


def _stream_generation(gateway, body: dict) -> list[tuple[str, dict]]:
    connection = gateway.connection()
    connection.request("POST", "/v1/images/generations", body=json.dumps(dict(body, stream=True)),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    events = [(name, data) for name, data, _ in sse_events(response)]
    connection.close()
    return events


# -- bad input and hostile files -------------------------------------------------------------------

GOOD = png(noisy_picture(64, 64))
BAD_REQUESTS = {  # (form fields, image, mask) -> (param, text the message holds)
    "not an image": (dict(prompt="a"), b"%PDF-1.4 not a picture", None, "image", "not an image"),
    "an empty file": (dict(prompt="a"), b"", None, "image", "empty"),
    "truncated PNG": (dict(prompt="a"), GOOD[: len(GOOD) // 2], None, "image", "truncated"),
    "bomb, 100000 x 100000": (dict(prompt="a"), png_declaring(100_000, 100_000), None, "image",
                              "too many pixels"),
    "bomb, 5000 x 5000": (dict(prompt="a"), png_declaring(5000, 5000), None, "image",
                          "5000 x 5000 pixels"),
    "bomb as the mask": (dict(prompt="a"), GOOD, png_declaring(60_000, 60_000), "mask", "pixels"),
    "mask of another size": (dict(prompt="a"), GOOD, png(np.zeros((32, 64), np.uint8)), "mask",
                             "64 x 64, got 64 x 32"),
    "mask not an image": (dict(prompt="a"), GOOD, b"GIF89a\x00", "mask", "mask"),
    "strength 0": (dict(prompt="a", strength=0), GOOD, None, "strength", "greater than 0"),
    "strength 1.5": (dict(prompt="a", strength=1.5), GOOD, None, "strength", "1.5"),
    "strength not a number": (dict(prompt="a", strength="lots"), GOOD, None, "strength", "lots"),
    "strength NaN": (dict(prompt="a", strength="nan"), GOOD, None, "strength", "nan"),
    "unknown image_role": (dict(prompt="a", image_role="style"), GOOD, None, "image_role", "style"),
    "reference without Kontext": (dict(prompt="a", image_role="reference"), GOOD, None, "image_role",
                                  "Kontext"),
    "strength leaves no step": (dict(prompt="a", strength="1e-20", steps=4), GOOD, None, "strength",
                                "no step"),
    "no image": (dict(prompt="a"), None, None, "image", "required"),
    "no prompt": (dict(), GOOD, None, "prompt", "required"),
    "n not a number": (dict(prompt="a", n="two"), GOOD, None, "n", "two"),
    "size not WxH": (dict(prompt="a", size="big"), GOOD, None, "size", "WxH"),
    "size not a multiple": (dict(prompt="a", size="100x100"), GOOD, None, "size", "multiple of 16"),
    "unknown field": (dict(prompt="a", quality="high"), GOOD, None, "quality", "not permitted"),
    "response_format url": (dict(prompt="a", response_format="url"), GOOD, None, "response_format", "url"),
    "loras not JSON": (dict(prompt="a", loras="outline:0.8"), GOOD, None, "loras", "JSON list"),
    "unknown lora": (dict(prompt="a", loras='[{"name": "nope"}]'), GOOD, None, "loras", "nope"),
    "partial_images negative": (dict(prompt="a", partial_images=-1), GOOD, None, "partial_images", "-1"),
}


def test_bad_requests_are_400_naming_the_field_and_the_server_keeps_serving(gateway):
    for label, (fields, image, mask, param, text) in BAD_REQUESTS.items():
        status, body, _ = _edit(gateway, fields, image, mask)
        error = body.get("error", {})
        assert status == 400 and error.get("param") == param and text in error["message"], \
            (label, status, body)
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    files = [("image", "a.png", GOOD), ("image", "b.png", GOOD)]
    status, body, _ = gateway.post_form("/v1/images/edits", {"prompt": "a"}, files)
    assert status == 400 and body["error"]["param"] == "image" and "one image" in body["error"]["message"]
    status, body, _ = gateway.post_form("/v1/images/edits", {"image": "text, not a file", "prompt": "a"},
                                        [])
    assert status == 400 and body["error"]["param"] == "image"
    status, body, _ = gateway.post_form("/v1/images/edits", {"prompt": "a"},
                                        [("image", "a.png", GOOD), ("prompt", "p.txt", b"b")])
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body, _ = gateway.post("/v1/images/edits", {"prompt": "a"})  # JSON, not a form
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    status, body, _ = gateway.post("/v1/images/edits", b"--x\r\nbroken",
                                   {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    status, body, _ = _edit(gateway, dict(prompt="a", seed=1, steps=2, strength=1), GOOD)
    assert status == 200, body  # and the server serves on


def _raw_upload(port: int, body: bytes, content_type: str, chunked: bool) -> tuple[int, dict]:
    """POST a multipart body framed by Content-Length or chunked (64 KiB chunks)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        head = (b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type.encode()
                + (b"\r\nTransfer-Encoding: chunked" if chunked else b"\r\nContent-Length: %d" % len(body))
                + b"\r\n\r\n")
        try:
            client.sendall(head)
            if chunked:
                for offset in range(0, len(body), 1 << 16):
                    piece = body[offset: offset + (1 << 16)]
                    client.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                client.sendall(b"0\r\n\r\n")
            else:
                client.sendall(body)
        except OSError:  # answered before the body was all sent, and closed
            pass
        reply = b""
        while True:
            data = client.recv(1 << 16)
            if not data:
                break
            reply += data
            if b"\r\n\r\n" in reply:
                head_part, payload = reply.split(b"\r\n\r\n", 1)
                length = [line for line in head_part.split(b"\r\n")
                          if line.lower().startswith(b"content-length")]
                if length and len(payload) >= int(length[0].split(b":")[1]):
                    break
    head_part, payload = reply.split(b"\r\n\r\n", 1)
    return int(head_part.split(b" ", 2)[1]), json.loads(payload)


def test_uploads_are_limited_whatever_the_framing(served_shapes):
    """A body over `max_upload_bytes` is 413 by Content-Length and by the bytes read when chunked;
    under it, a chunked multipart upload is served; other paths keep the small JSON limit."""
    settings = GatewaySettings(triton_url=served_shapes.url, max_upload_bytes=300_000)
    over_body, over_type = multipart({"prompt": "a"}, [("image", "big.png", png(noisy_picture(400, 400)))])
    assert len(over_body) > 300_000
    with RunningGateway(settings) as gw:
        for chunked in (False, True):
            status, body = _raw_upload(gw.port, over_body, over_type, chunked)
            assert status == 413, (chunked, body)
        body, content_type = multipart(dict(prompt=PROMPT, seed=1, steps=2, strength=1), [
            ("image", "a.png", png(noisy_picture(160, 160))), ("mask", "m.png", png(box_mask(160, 160)))])
        assert len(body) > settings.max_body_bytes  # the JSON limit would have refused it
        status, answer = _raw_upload(gw.port, body, content_type, chunked=True)
        assert status == 200 and answer["data"], answer
        status, answer, _ = gw.post("/v1/images/generations", {"prompt": "x" * 70_000})
        assert status == 413


# -- the shared decoding and its conventions --------------------------------------------------------

@pytest.mark.fast
def test_mask_conventions():
    mask = box_mask(32, 48)
    # OpenAI: RGBA, transparent = edit; soft alpha becomes 255 - alpha
    rgba = np.dstack([np.zeros((32, 48, 3), np.uint8), 255 - mask])
    assert np.array_equal(decode_mask(png(rgba, "RGBA")), mask)
    la = np.dstack([np.full((32, 48), 90, np.uint8), np.where(mask == 255, 64, 255).astype(np.uint8)])
    assert np.array_equal(decode_mask(png(la, "LA")), np.where(mask == 255, 191, 0))
    # this server's: grey or RGB, white = repaint
    assert np.array_equal(decode_mask(png(mask, "L")), mask)
    assert np.array_equal(decode_mask(png(np.dstack([mask] * 3))), mask)
    buffer = io.BytesIO()
    Image.fromarray(mask).convert("1").save(buffer, format="PNG")  # 1-bit
    assert np.array_equal(decode_mask(buffer.getvalue()), mask)
    # RGBA opaque everywhere carries no transparency: read by its colour
    opaque = np.dstack([mask, mask, mask, np.full_like(mask, 255)])
    assert np.array_equal(decode_mask(png(opaque, "RGBA")), mask)
    # a palette PNG with a transparent index: transparent = edit
    palette = Image.fromarray((mask > 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=1)
    assert np.array_equal(decode_mask(buffer.getvalue()), mask)


@pytest.mark.fast
def test_images_decode_to_rgb_uint8():
    source = noisy_picture(20, 30, 4)
    assert np.array_equal(decode_image(png(source)), source)
    # EXIF orientation 6 (rotate 90° clockwise to view): the pixels come back upright
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, format="PNG", exif=exif)
    upright = decode_image(buffer.getvalue())
    assert upright.shape == (30, 20, 3) and np.array_equal(upright, np.rot90(source, -1))
    # palette, grey+alpha, CMYK JPEG, 16-bit grey: all RGB uint8
    assert decode_image(png(source[..., 0] // 64, "L")).shape == (20, 30, 3)
    palette = Image.fromarray(source).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert np.array_equal(decode_image(buffer.getvalue()), np.asarray(palette.convert("RGB")))
    la = decode_image(png(np.dstack([source[..., 0], source[..., 1]]), "LA"))
    assert np.array_equal(la, np.repeat(source[..., :1], 3, -1))
    buffer = io.BytesIO()
    Image.fromarray(source).convert("CMYK").save(buffer, format="JPEG")
    assert decode_image(buffer.getvalue()).shape == (20, 30, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(buffer, format="PNG")
    grey16 = decode_image(buffer.getvalue())
    assert grey16.dtype == np.uint8 and grey16[-1, -1, 0] == (599 * 100) >> 8
    # an animation: its first frame
    frames = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue()).max() < 50


@pytest.mark.fast
def test_hostile_files_are_refused_before_decoding():
    for data, text in ((png_declaring(100_000, 100_000), "too many pixels"),
                       (png_declaring(5000, 5000), "at most"),
                       (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image"),
                       (GOOD[:-30], "truncated"),
                       (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image")):
        with pytest.raises(ImageFileError, match=text) as caught:
            decode_image(data)
        assert caught.value.field == "image"
    with pytest.raises(ImageFileError, match="one size"):
        edit_inputs([GOOD, png(noisy_picture(32, 64))])


@pytest.mark.fast
def test_partial_image_steps_spread_over_the_run():
    assert list(partial_image_steps(None, 4)) == [1, 2, 3, 4]
    assert partial_image_steps(3, 12) == {4, 8, 12}
    assert partial_image_steps(2, 5) == {3, 5}
    assert partial_image_steps(0, 5) == set()
    assert list(partial_image_steps(9, 4)) == [1, 2, 3, 4]
