"""The HTTP gateway run by uvicorn in a thread, for tests, a multipart form writer and a small SSE
reader."""

from __future__ import annotations

import base64
import http.client
import io
import json
import secrets
import threading
import time

import numpy as np
import uvicorn
from PIL import Image

from devtools.processes import free_port
from flux_triton.gateway.app import GatewaySettings, create_app


class RunningGateway:
    """uvicorn serving `create_app(settings)` on 127.0.0.1 from a daemon thread."""

    def __init__(self, settings: GatewaySettings, app=None):
        self.port = free_port()
        config = uvicorn.Config(app or create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def post(self, path: str, body: dict | bytes, headers: dict | None = None
             ) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of a POST."""
        connection = self.connection()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", path, body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, json.loads(payload) if payload else {}, dict(response.getheaders())

    def post_form(self, path: str, fields: dict, files: list[tuple[str, str, bytes]],
                  headers: dict | None = None) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of a multipart/form-data POST."""
        body, content_type = multipart(fields, files)
        return self.post(path, body, {"Content-Type": content_type, **(headers or {})})

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
        connection = self.connection()
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, payload, dict(response.getheaders())


def multipart(fields: dict, files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data form: text `fields` (values as str()) and
    `files` as (field name, file name, bytes)."""
    boundary = secrets.token_hex(16)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def sse_events(response: http.client.HTTPResponse, stop_after: int | None = None):
    """(event name, data, seconds since the first byte was asked for) from an SSE response;
    `stop_after` partial images and the reading stops."""
    began = time.perf_counter()
    name, data, partials = "message", "", 0
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and data:
            yield name, json.loads(data), time.perf_counter() - began
            if name == "image_generation.partial_image":
                partials += 1
                if stop_after is not None and partials >= stop_after:
                    return
            name, data = "message", ""


def b64_image(b64: str) -> np.ndarray:
    """uint8 [H, W, 3]: an image the gateway sent as base64 PNG."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
