"""An HTTP front door to the Triton server: OpenAI's `/v1/images/generations` and
`/v1/images/edits`, with the image's previews streamed as Server-Sent Events, and a web page that
shows them live.

The gateway talks to Triton over gRPC streaming (tritonclient's asyncio client) and knows nothing of
torch: requests become `flux_bls` inputs, its step responses become preview images.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from flux_triton.admission import Admission, QueueFull
from flux_triton.clients.image_files import MAX_IMAGE_PIXELS, ImageFileError, edit_inputs
from flux_triton.clients.previews import bls_options, linear_renderer, to_uint8_image, vae_inputs
from flux_triton.clients.stream_client import build_inputs
from flux_triton.errors import client_error_kind, named_field, retry_after_s, retry_after_text
from flux_triton.request import LORA_SCALE_LIMIT
from flux_triton.serving_config import BlsOptions
from flux_triton.specs import CACHE_THRESHOLD_RANGE, IMAGE_ROLES, NUMBER_RANGES, bls_input

MODEL = "flux_bls"
CLIENT_STATE = "flux_client"  # the request scope's note of whose API key it carries
STATIC = Path(__file__).resolve().parent / "static"
# flux_bls input -> the request field a client of this API wrote
PARAMS = {"num_images_per_prompt": "n", "height": "size", "width": "size",
          "num_inference_steps": "steps", "prompt_2": "prompt", "lora": "loras",
          "lora_scale": "loras"}


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway serves and how (read from GATEWAY_* variables by `from_env`)."""

    triton_url: str = "127.0.0.1:8001"
    # bearer token required on /v1/* when set; several, comma-separated, are served in turn
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 16 * 1024 * 1024  # the body limit of the paths that take image files
    max_image_pixels: int = MAX_IMAGE_PIXELS  # an uploaded file declaring more is not decoded
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers at all
    preview_decoder: str = "vae"  # vae: the server's VAE decodes each preview; linear: the fitted map
    preview_format: str = "jpeg"
    # generations forwarded to Triton at once, the others wait in the gateway's line, each API key
    # in turn; None: what the server runs at once (its MAX_INFLIGHT x its flux_bls instances)
    max_inflight: int | None = None
    # requests that may wait in the gateway's line; None: the server's MAX_QUEUE
    max_queue: int | None = None

    @property
    def api_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in (self.api_key or "").split(",") if k.strip())

    @classmethod
    def from_env(cls, environ=os.environ) -> GatewaySettings:
        origins = tuple(o.strip() for o in environ.get("GATEWAY_CORS_ORIGINS", "").split(",")
                        if o.strip())
        return cls(triton_url=environ.get("GATEWAY_TRITON_URL", cls.triton_url),
                   api_key=environ.get("GATEWAY_API_KEY") or None,
                   max_body_bytes=int(environ.get("GATEWAY_MAX_BODY_BYTES", cls.max_body_bytes)),
                   max_upload_bytes=int(environ.get("GATEWAY_MAX_UPLOAD_BYTES", cls.max_upload_bytes)),
                   max_image_pixels=int(environ.get("GATEWAY_MAX_IMAGE_PIXELS", cls.max_image_pixels)),
                   cors_origins=origins,
                   preview_decoder=environ.get("GATEWAY_PREVIEW_DECODER", cls.preview_decoder),
                   preview_format=environ.get("GATEWAY_PREVIEW_FORMAT", cls.preview_format),
                   max_inflight=_optional_int(environ.get("GATEWAY_MAX_INFLIGHT")),
                   max_queue=_optional_int(environ.get("GATEWAY_MAX_QUEUE")))


def _optional_int(text: str | None) -> int | None:
    return int(text) if text else None


def client_name(key: str | None) -> str:
    """Whose a request is, for the gateway's turns: a digest of its API key (never the key)."""
    return "" if key is None else "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _most(bls_field: str) -> int | float:
    """The largest value the flux_bls input's declared type holds (checked here, before any
    fixed-width conversion, so nothing wraps)."""
    return NUMBER_RANGES[bls_input(bls_field).dtype][1]


class LoraChoice(BaseModel):
    """One LoRA adapter of a request, by name, with its scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-LORA_SCALE_LIMIT, le=LORA_SCALE_LIMIT)


class GenerationRequest(BaseModel):
    """OpenAI's images request, with this server's extra fields at top level. Strict: a number
    must be a JSON number and a flag a JSON boolean."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4096)
    model: str | None = None  # accepted for compatibility; the server has one model
    n: int = Field(1, ge=1, le=16)
    size: str | None = Field(None, max_length=64, description="WxH, e.g. 1024x1024, or auto")
    response_format: Literal["b64_json"] = "b64_json"
    stream: bool = False
    # None: a partial image every step; k: k of them, spread evenly and ending at the last step
    partial_images: int | None = Field(None, ge=0, le=_most("num_inference_steps"))
    seed: int | None = Field(None, ge=0, le=_most("seed"))
    steps: int | None = Field(None, ge=1, le=_most("num_inference_steps"))
    guidance_scale: float | None = Field(None, ge=-_most("guidance_scale"),
                                         le=_most("guidance_scale"))
    negative_prompt: str | None = Field(None, max_length=4096)
    true_cfg_scale: float | None = Field(None, ge=-_most("true_cfg_scale"),
                                         le=_most("true_cfg_scale"))
    max_sequence_length: int | None = Field(None, ge=1, le=_most("max_sequence_length"))
    deadline_ms: int | None = Field(None, ge=1, le=_most("deadline_ms"))
    preview: Literal["x0", "latent", "none"] = "x0"
    loras: list[LoraChoice] = Field(default_factory=list, max_length=16)
    # the fast tier: diffusers' first-block cache at this threshold (0 or absent: off)
    cache_threshold: float | None = Field(None, ge=CACHE_THRESHOLD_RANGE[0],
                                          le=CACHE_THRESHOLD_RANGE[1])

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None or value == "auto":  # auto: the server's default (an edit: the image's)
            return None
        match = re.fullmatch(r"(\d+)x(\d+)", value)
        if not match:
            raise ValueError(f"must be WxH in pixels, e.g. 1024x1024, got {value!r}")
        most = _most("height")
        if not all(1 <= int(side) <= most for side in match.groups()):
            raise ValueError(f"each side must be in [1, {most}], got {value!r}")
        return value

    def bls_fields(self) -> dict:
        """The flux_bls inputs of this request (None: the server's default). Only a streamed
        request asks for previews, and only when it wants partial images: nobody would see the
        others'."""
        width, height = (int(v) for v in self.size.split("x")) if self.size else (None, None)
        previews = self.stream and self.partial_images != 0
        return dict(prompt=self.prompt, num_images_per_prompt=self.n, width=width, height=height,
                    seed=self.seed, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                    negative_prompt=self.negative_prompt, true_cfg_scale=self.true_cfg_scale,
                    max_sequence_length=self.max_sequence_length, deadline_ms=self.deadline_ms,
                    preview_kind=self.preview if previews else "none",
                    lora=[c.name for c in self.loras] or None,
                    lora_scale=[c.scale for c in self.loras] or None,
                    cache_threshold=self.cache_threshold)


class EditRequest(GenerationRequest):
    """OpenAI's image edit request (its multipart form's text fields, the files apart), with
    this server's `strength` and `image_role`."""

    strength: float | None = Field(None, gt=0, le=1)
    image_role: Literal[IMAGE_ROLES] | None = None

    def bls_fields(self) -> dict:
        return dict(super().bls_fields(), strength=self.strength, image_role=self.image_role)


# The multipart form of /v1/images/edits: file fields (OpenAI's `image[]` is `image` repeated)
IMAGE_FIELDS, MASK_FIELD = ("image", "image[]"), "mask"
FORM_LIMITS = dict(max_files=8, max_fields=32, max_part_size=64 * 1024)


class GatewayError(Exception):
    """An error to answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def triton_error(message: str) -> GatewayError:
    """A flux_bls error as HTTP, by what it means (`flux_triton.errors`): invalid input 400 (naming
    the field in this API's words), try again later 503, a transport deadline 504, a failure 500."""
    kind = client_error_kind(message)
    if kind == "invalid_argument":
        return GatewayError(400, message, _param(message))
    if kind == "resource_exhausted":
        return queue_full(message, retry_after_s(message) or 1)
    if kind == "unavailable":
        return unavailable(message)
    if kind == "timeout":
        return GatewayError(504, message, kind="timeout_error")
    return GatewayError(500, message, kind="server_error")


def unavailable(message: str) -> GatewayError:
    return GatewayError(503, message, kind="server_error", code="unavailable")


def queue_full(message: str, retry_after: int) -> GatewayError:
    """429: the queue (the server's MAX_QUEUE, or the gateway's line) is full; try again later."""
    return GatewayError(429, message, kind="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(retry_after)})


@dataclass
class Generation:
    """What one request streamed back (its steps went to the caller as they came)."""

    steps: int = 0
    images: np.ndarray | None = None
    seed: int | None = None
    timings: dict | None = None
    partial: bool = False
    steps_completed: int | None = None


def encode_image(rgb: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG" if fmt == "jpeg" else "PNG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class StreamHandle:
    """The Triton stream of one generation, cancellable from synchronous code."""

    stream: object | None = None
    finished: bool = False  # the image (or an error) arrived: nothing left to cancel

    def cancel(self) -> None:
        # Never after the final response: that wedges flux_bls's unload on Triton 2.51.
        if self.stream is not None and not self.finished:
            self.stream.cancel()
            self.finished = True


class TritonStreams:
    """Generations on a Triton server, over one asyncio gRPC client."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.client = grpcclient.InferenceServerClient(settings.triton_url)
        self._options: BlsOptions | None = None
        self._line: Admission | None = None

    async def line(self) -> Admission:
        """The gateway's line: as many generations forwarded at once as the server runs, the
        others waiting, each API key in turn (`flux_triton.admission`)."""
        if self._line is None:
            options = await self.options()
            instances = max(1, len(options.networks_by_gpu or {}))
            inflight = self.settings.max_inflight or options.max_inflight * instances
            most = self.settings.max_queue if self.settings.max_queue is not None else options.max_queue
            if self._line is None:
                self._line = Admission(inflight, most)
        return self._line

    async def queued_generate(self, fields: dict, handle: StreamHandle, client: str = ""
                              ) -> AsyncIterator[tuple[str, dict]]:
        """`generate` once this request's turn comes: ("queued", {"queue_position": n}) while it
        waits in the gateway's line (and as the server says it waits in its own), then the
        generation's events. A full line is a 429 at once."""
        try:
            line = await self.line()
        except (InferenceServerException, grpc.RpcError) as exc:
            detail = exc.message() if isinstance(exc, InferenceServerException) else exc.details()
            raise unavailable(f"the server is unavailable: {detail}") from exc
        places: asyncio.Queue[int] = asyncio.Queue()
        try:
            ticket = line.enter(on_position=places.put_nowait, key=client)
        except QueueFull as exc:
            raise queue_full(f"{exc} at the gateway; {retry_after_text(exc.retry_after_s)}",
                             exc.retry_after_s) from None
        waiting = None if ticket.running else asyncio.ensure_future(line.wait(ticket))
        try:
            while waiting is not None and not waiting.done():
                place = asyncio.ensure_future(places.get())
                await asyncio.wait({waiting, place}, return_when=asyncio.FIRST_COMPLETED)
                if place.done():
                    yield "queued", {"queue_position": place.result()}
                else:
                    place.cancel()
            async for event in self.generate(fields, handle):
                yield event
        finally:
            if waiting is not None and not waiting.done():
                waiting.cancel()
            line.leave(ticket)

    async def options(self) -> BlsOptions:
        if self._options is None:
            config = await self.client.get_model_config(MODEL, as_json=True)
            self._options = bls_options(config["config"])
        return self._options

    async def list_loras(self) -> dict:
        """The LoRA adapters flux_bls serves (its answer to `list_loras`)."""
        async def request():
            yield {"model_name": MODEL, "inputs": build_inputs(list_loras=True)}

        answer = None
        try:  # read to the stream's end: a stream left open after its final response is cancelled
            async for result, error in self.client.stream_infer(request()):
                if error is not None:
                    raise triton_error(error.message() if hasattr(error, "message") else str(error))
                answer = json.loads(result.as_numpy("loras")[0])
        except (InferenceServerException, grpc.RpcError) as exc:
            detail = exc.message() if isinstance(exc, InferenceServerException) else exc.details()
            raise unavailable(f"the server is unavailable: {detail}") from exc
        if answer is None:
            raise unavailable("flux_bls did not answer list_loras")
        return answer

    async def ready(self) -> bool:
        try:
            return (await self.client.is_server_ready()) and (await self.client.is_model_ready(MODEL))
        except InferenceServerException:
            return False

    async def generate(self, fields: dict, handle: StreamHandle | None = None
                       ) -> AsyncIterator[tuple[str, dict]]:
        """("step", step) for every step, then ("image", Generation). Leaving the iteration early
        (a client that went away) cancels the Triton request, which stops the denoising loop;
        `handle.cancel()` does the same from outside, without awaiting anything. The image or the
        error is handed over once the stream has ended: a caller that stops there leaves no open
        stream behind, which gRPC would cancel when collected, after the final response."""
        try:
            inputs = build_inputs(**fields)
        except ValueError as exc:  # a number its declared type cannot hold
            raise GatewayError(400, str(exc), _param(str(exc))) from None

        async def requests():
            yield {"model_name": MODEL, "inputs": inputs}

        stream = self.client.stream_infer(requests())
        handle = handle or StreamHandle()
        handle.stream = stream
        finished = False
        last = time.perf_counter()
        generation = Generation()
        failure = None
        try:
            async for result, error in stream:
                if error is not None:
                    finished = handle.finished = True
                    failure = triton_error(error.message() if hasattr(error, "message") else str(error))
                    continue
                names = {o.name for o in result.get_response().outputs}
                now = time.perf_counter()
                if "queue_position" in names:  # waiting in the server's own line
                    yield "queued", {"queue_position": int(result.as_numpy("queue_position")[0])}
                    continue
                if "step" in names:
                    preview = None
                    for name in ("preview_x0", "preview_latent"):
                        if name in names:
                            preview = result.as_numpy(name)
                            break
                    step = {"step": int(result.as_numpy("step")[0]),
                            "total_steps": int(result.as_numpy("total_steps")[0]),
                            "timestep": float(result.as_numpy("timestep")[0]),
                            "ms": round((now - last) * 1000, 1), "preview": preview}
                    generation.steps += 1
                    yield "step", step
                if "image" in names:
                    finished = handle.finished = True
                    generation.images = result.as_numpy("image")
                    generation.seed = int(result.as_numpy("seed")[0])
                    generation.timings = json.loads(result.as_numpy("timings")[0])
                    generation.partial = bool(result.as_numpy("partial")[0])
                    generation.steps_completed = int(result.as_numpy("steps_completed")[0])
                last = now
        except (InferenceServerException, grpc.RpcError) as exc:  # no server, or it went away
            finished = True
            detail = exc.message() if isinstance(exc, InferenceServerException) else exc.details()
            raise unavailable(f"the server is unavailable: {detail}") from exc
        finally:
            if not finished:
                stream.cancel()
        if failure is not None:
            raise failure
        if not finished:
            raise unavailable("the stream ended without an image")
        yield "image", generation

    async def render_preview(self, latent: np.ndarray) -> np.ndarray | None:
        """A preview latent [B, C, h, w] as uint8 [h', w', 3] of the first image."""
        try:
            options = await self.options()
            if self.settings.preview_decoder == "vae":
                latents, dtype = vae_inputs(latent[:1], options)
                tensor = InferInput("latents", list(latents.shape), dtype)
                tensor.set_data_from_numpy(latents)
                result = await self.client.infer("vae_decoder", [tensor])
                return (await asyncio.to_thread(to_uint8_image, result.as_numpy("image")))[0]
        except (InferenceServerException, grpc.RpcError) as exc:
            detail = exc.message() if isinstance(exc, InferenceServerException) else exc.details()
            raise unavailable(f"the server is unavailable: {detail}") from exc
        render = linear_renderer(options)
        return None if render is None else render(latent[:1])[0]

    async def close(self) -> None:
        await self.client.close()


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway's ASGI application."""
    settings = settings or GatewaySettings.from_env()
    # No /docs page (it loads its scripts from a CDN); /openapi.json is behind the key.
    app = FastAPI(title="FLUX on Triton", docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.triton = None

    def triton() -> TritonStreams:
        if app.state.triton is None:  # created on the serving loop
            app.state.triton = TritonStreams(settings)
        return app.state.triton

    app.add_middleware(RequestGuard, settings=settings)
    if settings.cors_origins:  # added last, so outermost: preflights and the guard's 401/413 too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization",
                                                                         "Content-Type"])

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        error = validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        error = GatewayError(exc.status_code, str(exc.detail),
                             kind="invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(error.body(), status_code=error.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        error = GatewayError(500, f"the gateway failed: {type(exc).__name__}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/healthz")
    async def healthz():
        ready = await triton().ready()
        body = {"status": "ready" if ready else "unavailable"}
        if ready and (await triton().options()).random_weights:
            body["weights"] = "random"  # a benchmark deployment: its images mean nothing
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/loras")
    async def loras():
        """The LoRA adapters a request may name in `loras`, and those that cannot be served."""
        return JSONResponse(await triton().list_loras())

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def respond(body: GenerationRequest, fields: dict, request: Request) -> Response:
        """The generation of `fields`, as Server-Sent Events or as one JSON answer."""
        handle = StreamHandle()
        client = request.scope.get("state", {}).get(CLIENT_STATE, "")
        if body.stream:
            events = sse_events(triton(), fields, settings.preview_format, handle,
                                body.partial_images, client)
            # errors before the first event are HTTP errors; a client gone by then stops it
            first = await unless_client_leaves(request, anext(events), handle)
            if first is None:
                return Response(status_code=499)
            return StreamingResponse(_chain(first, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect() -> dict:
            async for kind, value in triton().queued_generate(fields, handle, client):
                if kind == "image":
                    return await asyncio.to_thread(completed_body, value)  # PNGs off the loop
            raise unavailable("the stream ended without an image")

        completed = await unless_client_leaves(request, collect(), handle)
        if completed is None:
            return Response(status_code=499)  # nobody is listening; nginx's "client closed"
        return JSONResponse(completed)

    @app.post("/v1/images/generations")
    async def generations(body: GenerationRequest, request: Request):
        return await respond(body, body.bls_fields(), request)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """OpenAI's multipart image edit: image-to-image, inpainting with a mask, or (on a Kontext
        model, `image_role=reference`) editing by instruction."""
        body, images, mask = await read_edit_form(request)
        try:  # decoded off the loop
            image, mask_array = await asyncio.to_thread(edit_inputs, images, mask,
                                                        settings.max_image_pixels)
        except ImageFileError as exc:
            raise GatewayError(400, str(exc), exc.field) from None
        return await respond(body, dict(body.bls_fields(), image=image, mask=mask_array), request)

    return app


async def read_edit_form(request: Request) -> tuple[EditRequest, list[bytes], bytes | None]:
    """The edit request of a multipart form: its text fields validated as `EditRequest` (numbers
    and flags as text, `loras` as a JSON string), its image files' bytes and the mask's."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise GatewayError(400, "/v1/images/edits takes multipart/form-data (an `image` file, a "
                           "`prompt`, ...)")
    images, mask, fields = [], None, {}
    async with request.form(**FORM_LIMITS) as form:
        for name, value in form.multi_items():
            is_file = not isinstance(value, str)
            if name in IMAGE_FIELDS + (MASK_FIELD,):
                if not is_file:
                    raise GatewayError(400, f"`{name}`: must be a file (a form part with a filename)",
                                       name.rstrip("[]"))
                data = await value.read()
                if name == MASK_FIELD:
                    if mask is not None:
                        raise GatewayError(400, "`mask`: one mask per request", MASK_FIELD)
                    mask = data
                else:
                    images.append(data)
                continue
            if is_file:
                raise GatewayError(400, f"`{name}`: must be a text field, not a file", name)
            if name in fields:
                raise GatewayError(400, f"`{name}`: sent more than once", name)
            fields[name] = value
    if not images:
        raise GatewayError(400, "`image`: an image file is required", "image")
    if len(images) > 1:
        # OpenAI composes several images into one; flux_bls edits one image per prompt
        raise GatewayError(400, f"`image`: one image per request (got {len(images)}): this server "
                           "edits one image per prompt, and an edit has one prompt", "image")
    if "loras" in fields:
        try:
            fields["loras"] = json.loads(fields["loras"])
        except ValueError:
            raise GatewayError(400, '`loras`: must be a JSON list, e.g. [{"name": "outline", '
                               f'"scale": 0.8}}], got {fields["loras"][:100]!r}', "loras") from None
    try:  # form fields are text: numbers and flags are read from it (lax), the rest as JSON's
        body = EditRequest.model_validate(fields, strict=False)
    except ValidationError as exc:
        raise validation_error([dict(e, loc=("body", *e["loc"])) for e in exc.errors()]) from None
    return body, images, mask


async def disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work, handle: StreamHandle):
    """`work`'s result, or None once the client has gone first: then the Triton stream is
    cancelled (the denoising loop stops) and `work` with it. `work`'s errors propagate."""
    running = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({running, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not running.done():  # the client went away (or this handler was cancelled)
            handle.cancel()
            running.cancel()
        gone.cancel()
    if not running.done() or running.cancelled():
        return None
    return running.result()


def _param(message: str) -> str | None:
    """The request field an error message names first, in this API's words."""
    named = named_field(message)
    return PARAMS.get(named, named) if named else None


def validation_error(errors: list[dict]) -> GatewayError:
    """The first of pydantic's errors about a request body, as a 400 naming the field."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return GatewayError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    location = [str(p) for p in first.get("loc", [])[1:]]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "value_error":  # our own validators quote the value themselves
        message = str((first.get("ctx") or {}).get("error", message))
    elif "input" in first and param is not None and first.get("type") != "missing":
        sent = json.dumps(first["input"]) if not isinstance(first["input"], str) \
            else repr(first["input"])
        message += f", got {sent[:100]}"
    return GatewayError(400, f"`{param}`: {message}" if param else message, param)


class RequestGuard:
    """ASGI middleware ahead of the app: on every path but the page and /healthz the API key is
    checked before a byte of the body is read, then every body is read up to `max_body_bytes`
    (`max_upload_bytes` on the paths that take image files, multipart or not) by the bytes that
    arrive, whatever the framing (Content-Length or chunked), and answered 413 past it."""

    PUBLIC = ("/", "/healthz")  # everything else needs the key when one is set
    UPLOADS = ("/v1/images/edits",)  # bodies with image files: `max_upload_bytes`

    def __init__(self, app, settings: GatewaySettings):
        self.app, self.settings = app, settings
        self.expected = {f"Bearer {key}".encode(): client_name(key) for key in settings.api_keys}

    def client(self, authorization: bytes) -> str | None:
        """Whose key `authorization` carries (`client_name`), None when it is no key of ours;
        every key is compared, in constant time each."""
        found = None
        for expected, name in self.expected.items():
            if hmac.compare_digest(authorization, expected):
                found = name
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if self.expected and self.route_path(scope) not in self.PUBLIC:
            client = self.client(headers.get(b"authorization", b""))
            if client is None:
                return await self.reply(send, GatewayError(
                    401, "a valid `Authorization: Bearer <key>` header is required",
                    code="invalid_api_key"))
            scope.setdefault("state", {})[CLIENT_STATE] = client
        uploads = self.route_path(scope) in self.UPLOADS
        limit = self.settings.max_upload_bytes if uploads else self.settings.max_body_bytes
        too_large = GatewayError(413, f"request body over {limit} bytes")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self.reply(send, too_large if declared.isdigit() else
                                    GatewayError(400, "Content-Length must be a number of bytes"))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                return await self.reply(send, too_large)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: what the connection does next (a disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    def route_path(scope) -> str:
        """The path the routes see: behind a proxy's prefix (`root_path`), without it."""
        path, root = scope["path"], scope.get("root_path", "")
        return (path[len(root):] or "/") if root and path.startswith(root) else path

    @staticmethod
    async def reply(send, error: GatewayError) -> None:
        payload = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


async def _chain(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


def completed_body(generation: Generation) -> dict:
    """OpenAI's images response, plus the seed, the timings and whether a deadline cut it short."""
    return {"created": int(time.time()),
            "data": [{"b64_json": encode_image(image, "png")} for image in generation.images],
            "seed": generation.seed, "timings": generation.timings, "partial": generation.partial,
            "steps_completed": generation.steps_completed,
            "output_format": "png"}


def _event(name: str, payload: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n"


def partial_image_steps(partial_images: int | None, total_steps: int) -> range | set[int]:
    """The steps that send a partial image: all of them (None), or `partial_images` of them
    spread evenly, the last at the last step."""
    if partial_images is None or partial_images >= total_steps:
        return range(1, total_steps + 1)
    return {math.ceil((i + 1) * total_steps / partial_images) for i in range(partial_images)}


async def sse_events(triton: TritonStreams, fields: dict, fmt: str, handle: StreamHandle,
                     partial_images: int | None = None, client: str = "") -> AsyncIterator[str]:
    """`image_generation.queued` with its `queue_position` while the request waits in line,
    `image_generation.partial_image` per step (the preview as an image), or for the steps
    `partial_images` picks, then `image_generation.completed` (or `error`). Yields one comment
    first, so that request errors surface before the response starts. A preview that cannot be
    decoded is sent without its image; the generation goes on."""
    generate = triton.queued_generate(fields, handle, client)
    try:
        first = await anext(generate)
    except StopAsyncIteration:
        raise GatewayError(503, "the stream ended without an image", kind="server_error") from None
    yield ": generating\n\n"
    index = 0
    pending = [first]
    try:
        while True:
            kind, value = pending.pop() if pending else await anext(generate)
            if kind == "queued":
                yield _event("image_generation.queued", {
                    "type": "image_generation.queued", "queue_position": value["queue_position"],
                    "created_at": int(time.time())})
                continue
            if kind == "step" and value["step"] not in partial_image_steps(partial_images,
                                                                           value["total_steps"]):
                continue
            if kind == "step":
                payload = {"type": "image_generation.partial_image", "partial_image_index": index,
                           "step": value["step"], "total_steps": value["total_steps"],
                           "timestep": value["timestep"], "step_ms": value["ms"],
                           "created_at": int(time.time())}
                if value["preview"] is not None:
                    try:
                        rgb = await triton.render_preview(value["preview"])
                    except GatewayError:  # e.g. the VAE being reloaded: this preview goes bare
                        rgb = None
                    if rgb is not None:
                        payload["b64_json"] = await asyncio.to_thread(encode_image, rgb, fmt)
                        payload["output_format"] = fmt
                index += 1
                yield _event("image_generation.partial_image", payload)
            else:
                body = await asyncio.to_thread(completed_body, value)  # PNGs off the loop
                yield _event("image_generation.completed", dict(
                    body, type="image_generation.completed", b64_json=body["data"][0]["b64_json"],
                    created_at=body["created"]))
                return
    except StopAsyncIteration:
        exc = unavailable("the stream ended without an image")
        yield _event("error", dict(exc.body(), type="error", status=exc.status))
    except GatewayError as exc:
        yield _event("error", dict(exc.body(), type="error", status=exc.status))
    except Exception as exc:  # every stream ends with `completed` or `error`
        error = GatewayError(500, f"the gateway failed: {type(exc).__name__}", kind="server_error")
        yield _event("error", dict(error.body(), type="error", status=error.status))
    finally:
        handle.cancel()  # the client went away mid-stream: stop the denoising loop


def main() -> None:
    """`make gateway`: serve the gateway with uvicorn (GATEWAY_HOST, GATEWAY_PORT)."""
    import uvicorn

    uvicorn.run(create_app(), host=os.environ.get("GATEWAY_HOST", "127.0.0.1"),
                port=int(os.environ.get("GATEWAY_PORT", "8080")), log_level="info")


if __name__ == "__main__":
    main()
