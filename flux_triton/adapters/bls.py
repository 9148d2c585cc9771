"""`flux_bls`: the shared pipeline driven by BLS calls to the component models, streamed per step.

The pipeline itself is `flux_triton.pipeline.generate`; this adapter turns its model calls into BLS
requests (retried by status code, batch-halved on out-of-memory), its events into streamed
responses, and its timings into Triton metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch

from flux_triton.adapters.backend import (
    error_response,
    from_torch,
    instance_device,
    log,
    lora_catalog,
    model_options,
    resolve_model_dir,
    status_code_name,
    to_torch,
)
from flux_triton.adapters.metrics import BlsMetrics
from flux_triton.admission import Admission, QueueFull, Ticket
from flux_triton.batching import CallBatcher
from flux_triton.dispatch import LoadBoard, board_folder
from flux_triton.errors import RESOURCE_EXHAUSTED, retry_after_text
from flux_triton.images import kontext_resolutions
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import Adapters, FinalImage, StageFailed, StepUpdate, Stop, generate
from flux_triton.placement import served_networks
from flux_triton.recovery import (
    OutOfMemory,
    RecoveryStats,
    RetryPolicy,
    call_with_recovery,
    classify_failure,
)
from flux_triton.request import InvalidRequest, asks_listing, listing_requested, validate_request
from flux_triton.serving_config import BlsOptions
from flux_triton.specs import (
    CACHE_STATE,
    TORCH_DTYPES,
    bls_spec,
    component_specs,
    networks,
    python_model_spec,
)

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). A thread
# back from a round trip to the server (a BLS call, a response sent, a metric) waits that long
# when another is busy; the loop, back from select(), does too (devtools.bench_backend_calls).
GIL_SWITCH_INTERVAL_S = 0.0005


class BlsFluxModels:
    """`FluxModels` as BLS calls to the component models, for one client request.

    `served_names` maps a network to the model its calls go to (its copy on this instance's GPU,
    see `flux_triton.placement`); a network not in it is called by its own name.
    """

    def __init__(self, pb: Any, batched: dict[str, set[str]], policy: RetryPolicy,
                 metrics: BlsMetrics, gpu: int | None, dit_batcher: CallBatcher | None = None,
                 input_types: dict[str, dict[str, torch.dtype]] | None = None,
                 served_names: dict[str, str] | None = None):
        # the networks of the served family: those `batched` names (`specs.networks`)
        self.pb = pb
        self.served_names = served_names or {}
        self.input_types = input_types or {}  # network -> its floating-point inputs' types
        self.dit_batcher = dit_batcher  # shares DiT calls with other requests (BATCH_DELAY_US)
        self.batched = batched
        self.policy = policy
        self.metrics = metrics
        self.stats = {m: RecoveryStats() for m in batched}
        self.request_kwargs = {}
        if gpu is not None:  # outputs land on this instance's own GPU
            self.request_kwargs["preferred_memory"] = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_GPU, gpu)

    async def _exec(self, model: str, inputs: list, outputs: list[str]) -> dict[str, torch.Tensor]:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=self.served_names.get(model, model), inputs=inputs,
            requested_output_names=outputs, **self.request_kwargs
        )
        began = time.perf_counter()
        response = await request.async_exec()
        self.metrics.component_latency[model].observe((time.perf_counter() - began) * 1000)
        if response.has_error():
            error = response.error()
            raise classify_failure(model, error.message(), status_code_name(pb, error))
        return {name: to_torch(pb.get_output_tensor_by_name(response, name)) for name in outputs}

    async def _network(self, model: str, inputs: dict[str, torch.Tensor], output: str,
                       adapters: Adapters = ()) -> torch.Tensor:
        return (await self._network_outputs(model, inputs, (output,), adapters))[output]

    async def _network_outputs(self, model: str, inputs: dict[str, torch.Tensor],
                               outputs: tuple[str, ...], adapters: Adapters = ()
                               ) -> dict[str, torch.Tensor]:
        wanted = self.input_types.get(model, {})
        # e.g. bf16 latents into a float32 VAE plan, or a bf16 DiT's float32 guidance input
        inputs = {n: v.to(wanted[n]) if n in wanted and v.dtype != wanted[n] else v
                  for n, v in inputs.items()}
        extra = adapter_tensors(self.pb, adapters)

        async def call(tensors):
            return await self._exec(
                model, [*(from_torch(self.pb, n, v) for n, v in tensors.items()), *extra],
                list(outputs))

        stats = self.stats[model]
        retries, splits = stats.retries, stats.batch_splits
        try:
            result = await call_with_recovery(model, call, inputs, self.batched[model], self.policy, stats)
        finally:
            self.metrics.retries[model].increment(stats.retries - retries)
            self.metrics.splits[model].increment(stats.batch_splits - splits)
        return result

    async def tokenize(self, prompts, prompts_2, max_sequence_length):
        pb = self.pb
        inputs = [
            pb.Tensor("prompt", np.array([p.encode() for p in prompts], dtype=object)),
            pb.Tensor("prompt_2", np.array([p.encode() for p in prompts_2], dtype=object)),
            pb.Tensor("max_sequence_length", np.array([max_sequence_length], dtype=np.int32)),
        ]
        ids = await self._exec("tokenizer", inputs, ["clip_input_ids", "t5_input_ids"])
        return ids["clip_input_ids"], ids["t5_input_ids"]

    async def tokenize_chat(self, prompts, max_sequence_length):
        pb = self.pb
        inputs = [
            pb.Tensor("prompt", np.array([p.encode() for p in prompts], dtype=object)),
            pb.Tensor("max_sequence_length", np.array([max_sequence_length], dtype=np.int32)),
        ]
        ids = await self._exec("tokenizer", inputs, ["input_ids", "attention_mask"])
        return ids["input_ids"], ids["attention_mask"]

    async def text_encoder(self, input_ids, attention_mask):
        return await self._network("text_encoder", {"input_ids": input_ids,
                                                    "attention_mask": attention_mask},
                                   "prompt_embeds")

    async def clip_encoder(self, input_ids, adapters=()):
        return await self._network("clip_encoder", {"input_ids": input_ids}, "pooled_prompt_embeds",
                                   adapters)

    async def t5_encoder(self, input_ids):
        return await self._network("t5_encoder", {"input_ids": input_ids}, "prompt_embeds")

    async def dit_transformer(self, inputs, adapters=()):
        if self.dit_batcher is not None:  # calls merge only with calls of the same adapters
            return (await self.dit_batcher.submit(inputs, adapters))["noise_pred"]
        return await self._network("dit_transformer", inputs, "noise_pred", adapters)

    async def dit_transformer_cached(self, inputs, adapters=()):
        outputs = ("noise_pred", *CACHE_STATE, "cache_computed")
        return await self._network_outputs("dit_transformer", inputs, outputs, adapters)

    async def vae_decoder(self, latents):
        return await self._network("vae_decoder", {"latents": latents}, "image")

    async def vae_encoder(self, image, noise=None):
        inputs = {"image": image} if noise is None else {"image": image, "noise": noise}
        return await self._network("vae_encoder", inputs, "latents")


def adapter_tensors(pb: Any, adapters: Adapters) -> list:
    """The `lora` and `lora_scale` inputs of a call to an adapted network (none: no adapters)."""
    if not adapters:
        return []
    return [pb.Tensor("lora", np.array([name.encode() for name, _ in adapters], dtype=object)),
            pb.Tensor("lora_scale", np.array([scale for _, scale in adapters], dtype=np.float32))]


def network_input_types(info, io_types: dict[str, str]) -> dict[str, dict[str, torch.dtype]]:
    """The torch type of every floating-point input of each network, from its spec at the I/O
    type it is served with (`io_types`: network -> FP32/FP16/BF16). Types can differ within a
    network: a bf16 DiT still takes its guidance in float32."""
    types = {}
    for model, io_type in io_types.items():
        spec = component_specs(info, io_type)[model]
        types[model] = {tensor.name: getattr(torch, TORCH_DTYPES[tensor.dtype])
                        for tensor in spec.inputs if tensor.dtype in TORCH_DTYPES}
    return types


def host_tensor(pb: Any, name: str, value: torch.Tensor) -> Any:
    """A response tensor in host memory.

    A client's outputs live in host memory (gRPC, HTTP), so a GPU tensor in a response would be
    copied to the host by the server anyway, after a round trip between this process and the
    server to place it; copying here, on the sender's thread, costs one device-to-host copy that
    overlaps the next step. On CPU this is `from_torch` (no copy).
    """
    if value.device.type != "cpu":
        value = value.to("cpu")
    return from_torch(pb, name, value)


class CancellationWatch:
    """Asks Triton, from one thread, whether the requests it watches were cancelled; the event
    loop reads a flag.

    `is_cancelled()` is a round trip to the server that releases the GIL. Made on the loop's
    thread before every step, each call let the other threads take the GIL and the loop waited to
    get it back (docs/performance.md, "Holding load"). Each request is asked about at most every
    `interval_s`, and never once `forget` has returned: Triton releases a request after its final
    response.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self._watched: dict[int, tuple[Any, threading.Event]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, request: Any) -> threading.Event:
        """An event set once Triton says `request` was cancelled."""
        cancelled = threading.Event()
        with self._lock:
            self._watched[id(request)] = (request, cancelled)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flux_bls_cancel", daemon=True)
                self._thread.start()
            self._changed.notify()
        return cancelled

    def forget(self, request: Any) -> None:
        with self._lock:  # waits for a call on `request` in progress
            self._watched.pop(id(request), None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._watched and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                keys = list(self._watched)
            began = time.monotonic()
            for key in keys:
                with self._lock:
                    entry = self._watched.get(key)
                    if entry is None or entry[1].is_set():
                        continue
                    try:
                        if entry[0].is_cancelled():
                            entry[1].set()
                    except Exception:  # asked again next round; the loop goes on
                        pass
            time.sleep(max(0.0, self.interval_s - (time.monotonic() - began)))


class OrderedSender:
    """A request's responses, sent in order from one worker thread: the denoising loop goes on to
    the next step while a preview is copied off the GPU and handed to Triton.

    `send` takes a response, or a function that builds one: that runs on the worker too, so the
    device-to-host copies of a response's tensors (see `host_tensor`) leave the loop's thread.
    The final response is held until `close`: the request's bookkeeping (its place in line, its
    metrics, the active count) is done before a client that got it can send its next request.
    """

    def __init__(self, sender: Any, final_flag: int, worker: ThreadPoolExecutor):
        self.sender, self.final_flag, self.worker = sender, final_flag, worker
        self.pending: list[asyncio.Future] = []
        self.final: tuple[Any, int] | None = None

    def send(self, response: Any = None, flags: int = 0) -> None:
        if flags & self.final_flag:
            self.final = (response, flags)
            return
        loop = asyncio.get_running_loop()
        self.pending.append(loop.run_in_executor(self.worker, self._send, response, flags))

    def _send(self, response: Any, flags: int) -> None:
        if callable(response):
            response = response()
        if flags:
            self.sender.send(response, flags=flags)
        else:
            self.sender.send(response)

    def _finish(self, before_final: Callable[[], None] | None) -> None:
        try:
            if before_final is not None:
                before_final()
        finally:
            if self.final is not None:
                self._send(*self.final)

    async def close(self, before_final: Callable[[], None] | None = None) -> None:
        """Send the final response after the others, `before_final` first (on the worker), then
        wait until everything is sent (raising what a send raised)."""
        loop = asyncio.get_running_loop()
        self.pending.append(loop.run_in_executor(self.worker, self._finish, before_final))
        await asyncio.gather(*self.pending)


class SendLanes:
    """The threads that send responses. A request keeps to one (its `OrderedSender`'s worker, so
    its responses stay in order); requests take them in turn. A thread per request cost the event
    loop a thread start, and a wait for the GIL, on every request."""

    def __init__(self, count: int = 8):
        self.lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"flux_bls_send_{i}")
                      for i in range(count)]
        self._turn = itertools.count()

    def next(self) -> ThreadPoolExecutor:
        return self.lanes[next(self._turn) % len(self.lanes)]

    def close(self) -> None:
        for lane in self.lanes:
            lane.shutdown(wait=False)


class PlaceReporter:
    """A waiting request's place in line, sent as `queue_position` responses at most once per
    `interval_s` (the latest place; the first at once): every request that starts moves everyone
    behind it up, and a response per waiting request per start costs the server more than the
    line saves (docs/performance.md, "Holding load")."""

    def __init__(self, send: Any, interval_s: float = 0.5):
        self.send, self.interval_s = send, interval_s
        self.last_sent = -float("inf")
        self.place: int | None = None
        self.pending: asyncio.TimerHandle | None = None
        self.ticket: Ticket | None = None

    def __call__(self, place: int) -> None:
        self.place = place
        wait = self.last_sent + self.interval_s - time.monotonic()
        if wait <= 0:
            self._flush()
        elif self.pending is None:
            self.pending = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        self.pending = None
        if self.ticket is not None and (self.ticket.running or self.ticket.done):
            return  # its steps have begun (or it left): a place would be stale
        self.last_sent = time.monotonic()
        self.send(self.place)

    def stop(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None


class FluxBlsModel:
    """The decoupled `flux_bls` model; subclasses set `pb` (triton_python_backend_utils)."""

    pb: Any

    def initialize(self, args: dict) -> None:
        pb = self.pb
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # this process serves flux_bls alone
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise pb.TritonModelException(
                "flux_bls streams responses: set model_transaction_policy { decoupled: true }"
            )
        options = model_options(args, BlsOptions).with_queue_overrides(os.environ)
        self.info = load_model_info(resolve_model_dir(args, options.model_dir))
        if self.info.kontext:  # its resolution table, read now rather than on a request's time
            kontext_resolutions(self.info.max_area)
        self.loras = lora_catalog(args, options.lora_dir)  # what requests may name
        for line in self.loras.lines():
            log(self.pb, f"flux_bls: {line}")
        self.limits = options.limits
        self.policy = options.retry
        self.input_names = [spec.name for spec in bls_spec(self.info).inputs]
        specs = component_specs(self.info)
        self.step_cache = options.backend == "torch"  # the DiT serves first-block caching
        # what is halved on out-of-memory: every batched input the served network takes
        served = networks(self.info)
        self.batched = {m: python_model_spec(specs[m], m, self.info, self.step_cache).batched_inputs()
                        for m in served}
        device = instance_device(args)
        self.gpu = None if device == "cpu" else int(device.split(":")[1])
        self.served_names = served_networks(options.networks_by_gpu, self.gpu, served)
        self.metrics = BlsMetrics(pb, self.gpu, served, on_error=lambda text: log(pb, text, error=True))
        # tritonserver starts every instance's process: its pid names the board they share
        self.board = LoadBoard(board_folder(os.getppid()),
                               f"{args.get('model_instance_name', 'flux_bls')}-{os.getpid()}", self.gpu)
        self.admission = Admission(options.max_inflight, options.max_queue, self.board)
        log(pb, f"flux_bls: {options.max_inflight} generations at once, the queue "
                f"{'unbounded' if options.max_queue is None else f'at most {options.max_queue}'}")
        self.active_lock = threading.Lock()
        self.cancellations = CancellationWatch()
        self.send_lanes = SendLanes()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.input_types = network_input_types(self.info, options.component_dtypes)
        self.dit_batcher = None
        delay_us = options.batch_delay_us
        if delay_us > 0:  # off by default: batched kernels round differently from single ones
            self.dit_batcher = CallBatcher(self._merged_dit_call, self.batched["dit_transformer"],
                                           delay_us / 1e6, self.limits.max_batch,
                                           on_batch=self.metrics.observe_dit_batch)

    async def _merged_dit_call(self, inputs: dict[str, torch.Tensor],
                               adapters: Adapters) -> dict[str, torch.Tensor]:
        """One DiT call for several requests' rows, all with the same adapters (retried and split
        like any other call)."""
        models = BlsFluxModels(self.pb, self.batched, self.policy, self.metrics, self.gpu,
                               input_types=self.input_types, served_names=self.served_names)
        return {"noise_pred": await models._network("dit_transformer", inputs, "noise_pred",
                                                    adapters)}

    def execute(self, requests: list) -> None:
        """Start `requests` on this instance's event loop, then return once this instance's GPU
        is among the server's least loaded (`flux_triton.dispatch`): until then Triton
        gives new requests to the other instances. Responses stream from the loop."""
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self._run_loop, name="flux_bls_loop", daemon=True).start()
        for request in requests:
            # a listing (the supervisor's probe too) goes to the loop: its answer shows the loop lives
            refused = None if self._asks_listing(request) else self.admission.refusal()
            if refused is not None:  # answered here: the loop may be busy for a while
                self._refuse(request.get_response_sender().send, refused)
                continue
            self._count_active(1)
            running = asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
            running.add_done_callback(self._request_done)
        try:
            self.board.wait_until_least_loaded()
        except Exception as exc:  # the requests run on: dispatch falls back to Triton's own
            log(self.pb, f"flux_bls: load board unreadable ({exc!r}); not waiting", error=True)
        return None

    def _asks_listing(self, request) -> bool:
        """A true `list_loras`: a present but false or malformed one is a generation's (refused
        or told why on the loop)."""
        tensor = self.pb.get_input_tensor_by_name(request, "list_loras")
        try:
            return tensor is not None and asks_listing(tensor.as_numpy())
        except InvalidRequest:
            return False

    def _run_loop(self) -> None:
        if self.gpu is not None and torch.cuda.is_available():
            torch.cuda.set_device(self.gpu)  # the current GPU is per thread
        self.loop.run_forever()

    def _count_active(self, change: int) -> None:
        with self.active_lock:  # the gauge ends at the last count, whichever thread set it
            # the gauge first: once the board says so, an execute waiting at it may return
            self.metrics.active_requests.set(self.board.active + change)
            try:
                self.board.add(change)
            except OSError as exc:  # a request must not fail for its count
                log(self.pb, f"flux_bls: load board not updated ({exc!r})", error=True)

    def _request_ended(self) -> None:
        """A request's bookkeeping, done before its final response can reach the client."""
        self._count_active(-1)
        self.metrics.flush()

    def _request_done(self, running) -> None:
        if not running.cancelled() and running.exception() is not None:
            log(self.pb, f"flux_bls: a request's stream broke: {running.exception()!r}", error=True)

    def finalize(self) -> None:
        self.cancellations.close()
        self.metrics.close()
        self.send_lanes.close()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.board.close()

    def _read_inputs(self, request) -> dict[str, np.ndarray]:
        raw = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                raw[name] = tensor.as_numpy()
        return raw

    async def _serve(self, request) -> None:
        sender = OrderedSender(request.get_response_sender(), self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                               self.send_lanes.next())
        try:
            await self._generate(request, sender)
        finally:
            await sender.close(before_final=self._request_ended)

    async def _generate(self, request, sender: OrderedSender) -> None:
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        began = time.monotonic()
        try:
            raw = self._read_inputs(request)
            if listing_requested(raw):  # a question, not a generation
                sender.send(pb.InferenceResponse([pb.Tensor("loras", np.array(
                    [json.dumps(self.loras.describe()).encode()], dtype=object))]), flags=final)
                return
            gen_request = validate_request(raw, self.info, self.limits, self.loras.adapters,
                                           step_cache=self.step_cache)
        except InvalidRequest as exc:
            sender.send(error_response(pb, f"flux_bls: {exc}", "INVALID_ARG"), flags=final)
            self.metrics.outcomes["invalid"].increment(1)
            return
        deadline = None if gen_request.deadline_ms is None else began + gen_request.deadline_ms / 1000
        cancelled = self.cancellations.watch(request)

        def stop_check():
            if cancelled.is_set():
                return Stop.CANCELLED
            if deadline is not None and time.monotonic() >= deadline:
                return Stop.DEADLINE
            return None

        try:
            ticket = await self._take_turn(sender, stop_check)
            if ticket is None:
                return
            try:
                await self._run(gen_request, sender, stop_check, began)
            finally:
                self.admission.leave(ticket)
                self.metrics.queue_length.set(self.admission.waiting)
        finally:
            self.cancellations.forget(request)

    async def _take_turn(self, sender: OrderedSender, stop_check) -> Ticket | None:
        """This request's turn (MAX_INFLIGHT), waiting in line as long as it takes and saying its
        place; None when it was refused (MAX_QUEUE) or ended while it waited (the stream is
        ended then)."""
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        places = PlaceReporter(lambda place: sender.send(partial(self._queue_response, place)))
        try:
            ticket = places.ticket = self.admission.enter(on_position=places)
        except QueueFull as exc:
            self._refuse(sender.send, exc)
            return None
        self.metrics.queue_length.set(self.admission.waiting)
        stopped = await self.admission.wait(ticket, stop_check, poll_s=0.5)
        places.stop()
        self.metrics.queue_length.set(self.admission.waiting)
        if stopped is None:
            self.metrics.queue_wait.observe(ticket.waited_s * 1000)
            return ticket
        if stopped is Stop.CANCELLED:
            self.metrics.outcomes["cancelled"].increment(1)
            sender.send(flags=final)
        else:  # no step ran: there is no image to give
            self.metrics.outcomes["failed"].increment(1)
            sender.send(error_response(
                pb, f"flux_bls: `deadline_ms` passed after {ticket.waited_s * 1000:.0f} ms in the "
                    "queue, before the first step", "UNAVAILABLE"), flags=final)
        return None

    async def _run(self, gen_request, sender: OrderedSender, stop_check, began: float) -> None:
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        models = BlsFluxModels(pb, self.batched, self.policy, self.metrics, self.gpu,
                               self.dit_batcher, self.input_types, self.served_names)
        outcome = "cancelled"
        # the batcher runs a DiT call at once when every active stream is waiting for one
        streams = self.dit_batcher.stream() if self.dit_batcher is not None else nullcontext()
        with streams:
            try:
                async for event in generate(gen_request, self.info, models, stop_check):
                    if isinstance(event, FinalImage):
                        self.metrics.sample_gpu_memory()
                        outcome = "partial" if event.partial else "completed"
                        sender.send(partial(self._image_response, event, models))
                        self.metrics.request_latency.observe((time.monotonic() - began) * 1000)
                        self.metrics.images.increment(event.image.shape[0])
                    else:
                        self.metrics.steps.increment(1)
                        self.metrics.step_latency.observe(event.seconds * 1000)
                        sender.send(partial(self._step_response, event))
                self.metrics.outcomes[outcome].increment(1)
                sender.send(flags=final)
            except StageFailed as exc:
                # UNAVAILABLE invites the client to try again later; a deterministic failure would not
                # go away by itself.
                transient = exc.cause.retryable or isinstance(exc.cause, OutOfMemory)
                hint = (f" ({exc.model} is unavailable: the server is restarting it; retry in a few "
                        "seconds)" if exc.cause.retryable else "")
                sender.send(error_response(pb, f"flux_bls: {exc}{hint}",
                                           "UNAVAILABLE" if transient else "INTERNAL"), flags=final)
                self.metrics.outcomes["failed"].increment(1)
            except Exception as exc:  # the stream must always end, or the request is lost
                sender.send(error_response(pb, f"flux_bls: {type(exc).__name__}: {exc}"), flags=final)
                self.metrics.outcomes["failed"].increment(1)

    def _refuse(self, send: Callable[..., None], refusal: QueueFull) -> None:
        """End a request's stream with the queue's refusal (RESOURCE_EXHAUSTED in its tag)."""
        self.metrics.queue_refusals.increment(1)
        self.metrics.flush()
        text = f"flux_bls: {refusal}; {retry_after_text(refusal.retry_after_s)}"
        send(error_response(self.pb, text, "UNAVAILABLE", tag=RESOURCE_EXHAUSTED),
             flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _queue_response(self, place: int) -> Any:
        return self.pb.InferenceResponse(
            [self.pb.Tensor("queue_position", np.array([place], dtype=np.int32))])

    def _step_response(self, event: StepUpdate) -> Any:
        pb = self.pb
        outputs = [
            pb.Tensor("step", np.array([event.step], dtype=np.int32)),
            pb.Tensor("total_steps", np.array([event.total_steps], dtype=np.int32)),
            pb.Tensor("timestep", np.array([event.timestep], dtype=np.float32)),
        ]
        if event.preview_latent is not None:
            outputs.append(host_tensor(pb, "preview_latent", event.preview_latent))
        if event.preview_x0 is not None:
            outputs.append(host_tensor(pb, "preview_x0", event.preview_x0))
        return pb.InferenceResponse(outputs)

    def _image_response(self, event: FinalImage, models: BlsFluxModels) -> Any:
        pb = self.pb
        timings = event.timings.spans_ms()
        recovery = {m: vars(s) for m, s in models.stats.items() if s.retries or s.batch_splits}
        extra = {"recovery": recovery} if recovery else {}
        if event.cache is not None:
            extra["first_block_cache"] = event.cache
        report = json.dumps(dict(timings, **extra))
        return pb.InferenceResponse([
            host_tensor(pb, "image", event.image),
            pb.Tensor("seed", np.array([event.seed], dtype=np.int64)),
            pb.Tensor("timings", np.array([report.encode()], dtype=object)),
            pb.Tensor("steps_completed", np.array([event.steps_completed], dtype=np.int32)),
            pb.Tensor("partial", np.array([event.partial], dtype=bool)),
        ])
