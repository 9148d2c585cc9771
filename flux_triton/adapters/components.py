"""The component models (`tokenizer`, `clip_encoder`, `t5_encoder`, `dit_transformer`, `vae_decoder`,
`vae_encoder`; FLUX.2's `text_encoder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from flux_triton.adapters.backend import (
    aligned,
    error_response,
    from_torch,
    instance_device,
    log,
    lora_catalog,
    model_options,
    resolve_model_dir,
    to_torch,
)
from flux_triton.adapters.faults import FaultInjector, InjectedUnavailable
from flux_triton.errors import OUT_OF_MEMORY_MARKER
from flux_triton.model_info import load_model_info
from flux_triton.recovery import is_out_of_memory
from flux_triton.runtime.acceleration import (
    Acceleration,
    compile_cache_location,
    eager_for_new_shapes,
    load_network,
)
from flux_triton.runtime.torch_components import has_random_weights, load_component
from flux_triton.serving_config import NetworkOptions
from flux_triton.specs import PROBE_INPUT, ServingShape, component_specs, step_cache_tensors


def failure_response(pb: Any, model: str, exc: Exception) -> Any:
    """The error a component returns, with the status code the BLS decides retries by.

    UNAVAILABLE for transient failures; INTERNAL otherwise, with `out of memory` in the text when
    the device ran out of memory (Triton has no status code for it; the BLS halves the batch).
    """
    status = "UNAVAILABLE" if isinstance(exc, InjectedUnavailable) else "INTERNAL"
    detail = f"{type(exc).__name__}: {exc}"
    if is_out_of_memory(exc):
        detail = f"{OUT_OF_MEMORY_MARKER}: {detail}"
    return error_response(pb, f"{model}: {detail}", status)


def is_probe(pb: Any, request) -> bool:
    """Whether `request` is the supervisor's probe (`specs.PROBE_INPUT`): answered at once."""
    return pb.get_input_tensor_by_name(request, PROBE_INPUT.name) is not None


def acceleration_options(args: dict, options: NetworkOptions) -> Acceleration:
    """The options' precision, compile, cuda_graphs, fp8_calibration, fuse_qkv and compile_cache_dir
    (relative to the model repository, like model_dir; $FLUX_TRITON_COMPILE_CACHE overrides the
    cache, e.g. for a read-only repository volume)."""
    repository = Path(args["model_repository"]).parent
    cache_dir = compile_cache_location(repository, options.compile_cache_dir)
    calibration = options.fp8_calibration and str(repository / options.fp8_calibration)
    return Acceleration(precision=options.precision, compile=options.compile,
                        cuda_graphs=options.cuda_graphs, cache_dir=cache_dir,
                        fp8_calibration=calibration, fuse_qkv=options.fuse_qkv)


class ComponentModel:
    """A served network: inputs and outputs by the names of its spec, computed by a runtime.

    Subclasses set `name` and `pb` (the triton_python_backend_utils module).
    """

    name: str
    pb: Any

    def initialize(self, args: dict) -> None:
        options = model_options(args, NetworkOptions)
        info = load_model_info(resolve_model_dir(args, options.model_dir))
        if has_random_weights(info.model_dir) != options.random_weights:
            raise ValueError(f"{info.model_dir}: weights are not what the repository was exported for "
                             f"(random_weights {options.random_weights}): export it again")
        if options.random_weights:
            log(self.pb, f"{self.name}: serving RANDOM weights (RANDOM_WEIGHTS=1)", error=True)
        self.device = instance_device(args)
        self.spec = component_specs(info, options.precision)[self.name]
        self.faults = FaultInjector(self.spec)
        self.adapters = None  # LoRA adapters, where this network serves them
        self.cache_tensors: tuple = ((), ())  # the DiT's first-block cache (PyTorch runtime)
        if options.backend == "onnx":
            from flux_triton.runtime.onnx_components import OnnxComponent

            onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
            self.component = OnnxComponent(onnx_path, self.spec, self.device)
            return
        if self.name == "dit_transformer" and not info.is_flux2:
            self.cache_tensors = step_cache_tensors(info, self.spec.input("hidden_states").dtype)
        acceleration = acceleration_options(args, options)
        warmup = tuple(ServingShape.parse(s) for s in options.warmup)
        catalog = lora_catalog(args, options.lora_dir)
        for line in catalog.lines():
            log(self.pb, f"{self.name}: {line}")
        phases: dict = {}
        network = load_network(self.name, info, self.device, acceleration, warmup, phases, catalog,
                               options.sequence_parallel_devices)
        self.component, self.adapters = network.run, network.adapters
        if acceleration.active:  # what a slow start spent its time on
            log(self.pb, f"{self.name} ready on {self.device}: {phases}")
        if acceleration.compile and warmup:
            eager_for_new_shapes()

    def finalize(self) -> None:
        """A sequence-parallel DiT stops its other ranks with it."""
        close = getattr(getattr(self, "component", None), "close", None)
        if close is not None:
            close()

    def _adapters(self, request) -> tuple[tuple[str, float], ...]:
        """The adapters a call names (flux_bls validated them), with their scales."""
        names = self.pb.get_input_tensor_by_name(request, "lora")
        if names is None:
            return ()
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.as_numpy().reshape(-1)]
        scales = self.pb.get_input_tensor_by_name(request, "lora_scale")
        scales = [1.0] * len(names) if scales is None else scales.as_numpy().reshape(-1).tolist()
        if names and self.adapters is None:
            raise ValueError(f"{self.name} serves no LoRA adapters, asked for {names}")
        return tuple(zip(names, scales))

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            if is_probe(pb, request):
                responses.append(pb.InferenceResponse([]))
                continue
            try:
                inputs = {}
                for spec in self.spec.inputs + self.cache_tensors[0]:
                    tensor = pb.get_input_tensor_by_name(request, spec.name)
                    if tensor is not None:
                        inputs[spec.name] = aligned(to_torch(tensor).to(self.device))
                self.faults.check(inputs)
                adapters = self._adapters(request)
                if self.adapters is not None:
                    self.adapters.apply(adapters)
                with torch.inference_mode():
                    outputs = self.component(**inputs)
                responses.append(pb.InferenceResponse(
                    [from_torch(pb, spec.name, outputs[spec.name])
                     for spec in self.spec.outputs + self.cache_tensors[1] if spec.name in outputs]
                ))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(failure_response(pb, self.name, exc))
        return responses


class TokenizerModel:
    """`tokenizer`: prompts -> CLIP ids and T5 ids, as FluxPipeline tokenizes (FLUX.2: the chat
    template's ids and attention mask, as its pipelines tokenize). Subclasses set `pb`."""

    pb: Any

    def initialize(self, args: dict) -> None:
        options = model_options(args, NetworkOptions)
        info = load_model_info(resolve_model_dir(args, options.model_dir))
        self.tokenizer = load_component("tokenizer", info)
        self.flux2 = info.is_flux2
        self.max_length = info.max_text_length

    def _strings(self, request, name: str) -> list[str]:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return [s.decode("utf-8") if isinstance(s, bytes) else str(s)
                for s in tensor.as_numpy().reshape(-1)]

    def _tokenize(self, request, max_seq: int) -> dict:
        prompts = self._strings(request, "prompt")
        if self.flux2:
            return self.tokenizer(prompts, max_seq)
        prompts_2 = self._strings(request, "prompt_2")
        if len(prompts) != len(prompts_2):
            raise ValueError(f"`prompt_2` must hold {len(prompts)} strings, got {len(prompts_2)}")
        return self.tokenizer(prompts, prompts_2, max_seq)

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            if is_probe(pb, request):
                responses.append(pb.InferenceResponse([]))
                continue
            try:
                max_seq = pb.get_input_tensor_by_name(request, "max_sequence_length").as_numpy()
                max_seq = int(np.asarray(max_seq).reshape(-1)[0])
                if not 1 <= max_seq <= self.max_length:
                    raise ValueError(
                        f"`max_sequence_length` must be in [1, {self.max_length}], got {max_seq}"
                    )
                ids = self._tokenize(request, max_seq)
                responses.append(pb.InferenceResponse(
                    [from_torch(pb, name, value) for name, value in ids.items()]
                ))
            except ValueError as exc:
                responses.append(error_response(pb, f"tokenizer: {exc}", "INVALID_ARG"))
            except Exception as exc:
                responses.append(failure_response(pb, "tokenizer", exc))
        return responses
