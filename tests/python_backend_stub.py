"""A stand-in for `triton_python_backend_utils`, enough to run the adapters in-process.

BLS requests go to the adapter instances registered in `models` (as a Triton repository would
route them) and are logged in `requested`; `failures` queues error responses per model so tests
can script bad days.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
import torch.utils.dlpack

TRITONSERVER_MEMORY_GPU = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonModelException(Exception):
    pass


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = \
        range(8)

    def __init__(self, message: str, code: int | None = None):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int | None:
        return self._code


class Tensor:
    def __init__(self, name: str, value):
        self._name, self._value = name, value

    @classmethod
    def from_dlpack(cls, name: str, capsule) -> Tensor:
        return cls(name, torch.utils.dlpack.from_dlpack(capsule))

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        value = self._value
        return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    def to_dlpack(self):
        value = self._value
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        return torch.utils.dlpack.to_dlpack(tensor)


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self._outputs, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs


class PreferredMemory:
    def __init__(self, kind: int, device_id: int = 0):
        self.kind, self.device_id = kind, device_id


class ResponseSender:
    """Collects what a decoupled model sends: (response or None, flags)."""

    def __init__(self):
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.on_final = None  # called once the final flag is sent

    def send(self, response=None, flags: int = 0) -> None:
        assert not self.finished, "sent after the final flag"
        self.sent.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL and self.on_final is not None:
            self.on_final()

    @property
    def finished(self) -> bool:
        return any(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, flags in self.sent)


class _Registry:
    models: dict = {}
    failures: dict[str, deque] = defaultdict(deque)
    calls: dict[str, int] = defaultdict(int)
    requested: list = []  # every BLS request sent, in order
    bls_instances: list = []  # closed (their load board entries removed) by reset


class Logger:
    lines: list[tuple[str, str]] = []  # (level, message)

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(("info", message))

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.lines.append(("error", message))


models = _Registry.models
failures = _Registry.failures
calls = _Registry.calls
requested = _Registry.requested


def reset() -> None:
    while _Registry.bls_instances:
        _Registry.bls_instances.pop().finalize()
    models.clear()
    failures.clear()
    calls.clear()
    requested.clear()


class InferenceRequest:
    def __init__(self, model_name: str = "", inputs=(), requested_output_names=(),
                 preferred_memory: PreferredMemory | None = None):
        self.model_name = model_name
        self.inputs = {t.name(): t for t in inputs}
        self.requested_output_names = list(requested_output_names)
        self.preferred_memory = preferred_memory
        self.sender = ResponseSender()
        self.cancel_after_steps: int | None = None

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        """True once the "client" has received `cancel_after_steps` steps (it then cancels)."""
        steps = sum(1 for r, _ in self.sender.sent if r is not None and not r.has_error()
                    and any(t.name() == "step" for t in r.output_tensors()))
        return self.cancel_after_steps is not None and steps >= self.cancel_after_steps

    async def async_exec(self) -> InferenceResponse:
        calls[self.model_name] += 1
        requested.append(self)
        if failures[self.model_name]:
            return InferenceResponse(error=failures[self.model_name].popleft())
        response = models[self.model_name].execute([self])[0]
        if response.has_error():  # as Triton 2.51 does (server issue #7804): the code is lost
            response = InferenceResponse(error=TritonError(response.error().message(),
                                                           TritonError.INTERNAL))
        return response


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request.inputs.get(name)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def using_decoupled_model_transaction_policy(config: dict) -> bool:
    return bool(config.get("model_transaction_policy", {}).get("decoupled"))


class _Metric:
    def __init__(self, labels: dict, buckets=None):
        self.labels, self.value, self.observations = labels, 0.0, []

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        self.observations.append(value)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = range(3)

    def __init__(self, name: str, description: str, kind: int):
        self.name, self.kind, self.metrics = name, kind, []

    def Metric(self, labels: dict, buckets=None) -> _Metric:  # noqa: N802 (pb_utils' spelling)
        self.metrics.append(_Metric(labels, buckets))
        return self.metrics[-1]


def model_args(repository: Path, name: str, options, decoupled: bool = False,
               gpu: int | None = None) -> dict:
    """The `args` Triton passes to `initialize` for an instance of `name` in `repository` with
    these options (`flux_triton.serving_config`), on the CPU or (by its args only: nothing here
    touches CUDA) on GPU `gpu`."""
    from flux_triton.serving_config import options_parameter

    config = {"name": name, "parameters": {k: {"string_value": v}
                                           for k, v in options_parameter(options).items()}}
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    return {"model_config": json.dumps(config), "model_instance_kind": "CPU" if gpu is None else "GPU",
            "model_instance_device_id": str(gpu or 0), "model_repository": str(repository / name),
            "model_version": "1", "model_name": name}


def wire_repository(model_dir: Path, folder: Path, bls_gpu: int | None = None,
                    precision: str = "FP32", **bls_options):
    """tokenizer, the four networks and flux_bls of `model_dir` as adapters over this stand-in,
    registered in `models` as Triton would route BLS calls; returns the flux_bls adapter (its
    args say GPU `bls_gpu` when given; the networks run on the CPU). `bls_options` are fields of
    flux_bls's `BlsOptions`."""
    import sys

    from flux_triton.adapters.bls import FluxBlsModel
    from flux_triton.adapters.components import ComponentModel, TokenizerModel
    from flux_triton.serving_config import BlsOptions, NetworkOptions
    from flux_triton.specs import NETWORKS

    stub = sys.modules[__name__]
    reset()
    for name in ("tokenizer", *NETWORKS):
        if name == "tokenizer":
            model = type("TokenizerModel", (TokenizerModel,), {"pb": stub})()
        else:
            model = type("ComponentModel", (ComponentModel,), {"pb": stub, "name": name})()
        model.initialize(model_args(folder, name, NetworkOptions(name, str(model_dir), precision)))
        models[name] = model
    bls = type("FluxBlsModel", (FluxBlsModel,), {"pb": stub})()
    options = BlsOptions(str(model_dir), precision, **bls_options)
    bls.initialize(model_args(folder, "flux_bls", options, decoupled=True, gpu=bls_gpu))
    _Registry.bls_instances.append(bls)
    return bls


def serve(bls, requests: list, timeout_s: float = 120.0) -> None:
    """`requests` handed to flux_bls's `execute` at once, as Triton does, then waited for until
    every stream has sent its final flag and the instance serves nothing (its metrics are set)."""
    import time

    bls.execute(requests)
    deadline = time.monotonic() + timeout_s
    while not (all(request.sender.finished for request in requests)
               and bls.metrics.active_requests.value == 0):
        assert time.monotonic() < deadline, "a stream did not end"
        time.sleep(0.002)


def flux_bls_request(**fields) -> InferenceRequest:
    """A flux_bls request of these fields, typed as its declared inputs."""
    from flux_triton.specs import bls_input
    from tests.reference import raw_inputs

    tensors = []
    for name, value in raw_inputs(**fields).items():
        dtype = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}.get(bls_input(name).dtype)
        tensors.append(Tensor(name, value if dtype is None else value.astype(dtype)))
    return InferenceRequest("flux_bls", tensors)
