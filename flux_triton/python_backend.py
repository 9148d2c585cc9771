"""Helpers shared by the Python-backend `model.py` adapters.

`triton_python_backend_utils` exists only inside Triton's stub process, so the adapters pass it in
as `pb`; this module never imports it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils.dlpack

from flux_triton.components import load_component
from flux_triton.model_info import load_model_info
from flux_triton.specs import TORCH_DTYPES, ComponentSpec, component_specs


def model_parameters(args: dict) -> dict[str, str]:
    """The `parameters` string values of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def instance_device(args: dict) -> str:
    """`cuda:N` for a KIND_GPU instance, else `cpu`."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


def to_torch(tensor: Any) -> torch.Tensor:
    """A Triton tensor as a torch tensor on the same device, without a copy."""
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def aligned(value: torch.Tensor) -> torch.Tensor:
    """A CPU tensor in freshly allocated memory.

    Tensors in Triton's shared memory can start at any offset, and CPU matmul kernels round
    differently on unaligned data (~1e-7): a copy keeps results bit-identical to diffusers.
    """
    return value.clone() if value.device.type == "cpu" else value


def from_torch(pb: Any, name: str, value: torch.Tensor) -> Any:
    """A torch tensor as a named Triton tensor, without a copy."""
    return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def error_response(pb: Any, message: str, code_name: str = "INTERNAL") -> Any:
    """An InferenceResponse carrying a TritonError with the given status code."""
    return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code_name)))


FAULTS_ENV = "FLUX_TRITON_FAULT_DIR"


class FaultInjector:
    """Test-only failures, enabled solely by the server's environment (FLUX_TRITON_FAULT_DIR).

    `<dir>/<model>.json` may hold {"fail_next": n} (the next n calls fail),
    {"oom_min_batch": k} (every call with a batch of k or more fails with out-of-memory) and
    {"delay_ms": t} (every call takes t ms longer).
    """

    def __init__(self, spec: ComponentSpec):
        fault_dir = os.environ.get(FAULTS_ENV)
        self.plan = Path(fault_dir) / f"{spec.name}.json" if fault_dir else None
        self.batched = spec.batched_inputs()

    def check(self, inputs: dict[str, torch.Tensor]) -> None:
        if self.plan is None or not self.plan.exists():
            return
        plan = json.loads(self.plan.read_text())
        time.sleep(plan.get("delay_ms", 0) / 1000)
        if plan.get("fail_next", 0) > 0:
            plan["fail_next"] -= 1
            self.plan.write_text(json.dumps(plan))
            raise RuntimeError("injected failure")
        batch = max((v.shape[0] for n, v in inputs.items() if n in self.batched), default=1)
        if batch >= plan.get("oom_min_batch", 1 << 30):
            raise RuntimeError(f"CUDA out of memory (injected for batch {batch})")


class ComponentModel:
    """A served network: inputs and outputs by the names of its spec, computed by `components`.

    Subclasses set `name` and `pb` (the triton_python_backend_utils module).
    """

    name: str
    pb: Any

    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        info = load_model_info(params["model_dir"])
        precision = params.get("precision", "FP32")
        self.device = instance_device(args)
        self.spec = component_specs(info, precision)[self.name]
        self.faults = FaultInjector(self.spec)
        if params.get("backend", "torch") == "onnx":
            from flux_triton.onnx_runtime import OnnxComponent

            onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
            self.component = OnnxComponent(onnx_path, self.spec, self.device)
        else:
            self.component = load_component(self.name, info, self.device, TORCH_DTYPES[precision])
            if params.get("compile") == "repeated_blocks":  # torch.compile each transformer block
                self.component.model.compile_repeated_blocks(fullgraph=True)

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            try:
                inputs = {}
                for spec in self.spec.inputs:
                    tensor = pb.get_input_tensor_by_name(request, spec.name)
                    if tensor is not None:
                        inputs[spec.name] = aligned(to_torch(tensor).to(self.device))
                self.faults.check(inputs)
                with torch.inference_mode():
                    outputs = self.component(**inputs)
                responses.append(pb.InferenceResponse(
                    [from_torch(pb, spec.name, outputs[spec.name]) for spec in self.spec.outputs]
                ))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(error_response(pb, f"{self.name}: {type(exc).__name__}: {exc}"))
        return responses
