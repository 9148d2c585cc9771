"""Triton Python model `flux_bls`: decoupled, streams one response per denoising step, then the image.

The pipeline itself is `flux_triton.pipeline.generate`; this adapter turns its model calls into BLS
requests and its events into streamed responses.
"""

import asyncio
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage, generate
from flux_triton.python_backend import (
    error_response,
    from_torch,
    instance_device,
    model_parameters,
    to_torch,
)
from flux_triton.request import InvalidRequest, ServingLimits, validate_request
from flux_triton.specs import bls_spec

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BlsFluxModels:
    """`FluxModels` as BLS calls to the component models."""

    def __init__(self, on_gpu: bool):
        self.request_kwargs = {}
        if on_gpu:
            self.request_kwargs["preferred_memory"] = pb_utils.PreferredMemory(
                pb_utils.TRITONSERVER_MEMORY_GPU, 0
            )

    async def _call(self, model: str, inputs: list, outputs: list[str]) -> list[torch.Tensor]:
        request = pb_utils.InferenceRequest(
            model_name=model, inputs=inputs, requested_output_names=outputs, **self.request_kwargs
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"{model} failed: {response.error().message()}")
        return [to_torch(pb_utils.get_output_tensor_by_name(response, name)) for name in outputs]

    async def tokenize(self, prompts, prompts_2, max_sequence_length):
        inputs = [
            pb_utils.Tensor("prompt", np.array([p.encode() for p in prompts], dtype=object)),
            pb_utils.Tensor("prompt_2", np.array([p.encode() for p in prompts_2], dtype=object)),
            pb_utils.Tensor("max_sequence_length", np.array([max_sequence_length], dtype=np.int32)),
        ]
        return await self._call("tokenizer", inputs, ["clip_input_ids", "t5_input_ids"])

    async def clip_encoder(self, input_ids):
        inputs = [from_torch(pb_utils, "input_ids", input_ids)]
        return (await self._call("clip_encoder", inputs, ["pooled_prompt_embeds"]))[0]

    async def t5_encoder(self, input_ids):
        inputs = [from_torch(pb_utils, "input_ids", input_ids)]
        return (await self._call("t5_encoder", inputs, ["prompt_embeds"]))[0]

    async def dit_transformer(self, inputs):
        tensors = [from_torch(pb_utils, name, value) for name, value in inputs.items()]
        return (await self._call("dit_transformer", tensors, ["noise_pred"]))[0]

    async def vae_decoder(self, latents):
        inputs = [from_torch(pb_utils, "latents", latents)]
        return (await self._call("vae_decoder", inputs, ["image"]))[0]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "flux_bls streams responses: set model_transaction_policy { decoupled: true }"
            )
        params = model_parameters(args)
        self.info = load_model_info(params["model_dir"])
        self.limits = ServingLimits(**{
            name: int(params[name]) for name in ServingLimits.__dataclass_fields__ if name in params
        })
        self.input_names = [spec.name for spec in bls_spec(self.info).inputs]
        self.models = BlsFluxModels(on_gpu=instance_device(args) != "cpu")

    async def execute(self, requests):
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    def _read_inputs(self, request) -> dict:
        raw = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                raw[name] = tensor.as_numpy()
        return raw

    async def _serve(self, request) -> None:
        sender = request.get_response_sender()
        try:
            gen_request = validate_request(self._read_inputs(request), self.info, self.limits)
            async for event in generate(gen_request, self.info, self.models):
                if isinstance(event, FinalImage):
                    timings = json.dumps(event.timings.spans_ms())
                    sender.send(pb_utils.InferenceResponse([
                        from_torch(pb_utils, "image", event.image),
                        pb_utils.Tensor("seed", np.array([event.seed], dtype=np.int64)),
                        pb_utils.Tensor("timings", np.array([timings.encode()], dtype=object)),
                    ]))
                else:
                    sender.send(pb_utils.InferenceResponse([
                        pb_utils.Tensor("step", np.array([event.step], dtype=np.int32)),
                        pb_utils.Tensor("total_steps", np.array([event.total_steps], dtype=np.int32)),
                        pb_utils.Tensor("timestep", np.array([event.timestep], dtype=np.float32)),
                        from_torch(pb_utils, "preview_latent", event.preview_latent),
                    ]))
            sender.send(flags=FINAL)
        except InvalidRequest as exc:
            sender.send(error_response(pb_utils, f"flux_bls: {exc}", "INVALID_ARG"), flags=FINAL)
        except Exception as exc:  # the stream must always end, or the request is lost
            sender.send(error_response(pb_utils, f"flux_bls: {type(exc).__name__}: {exc}"),
                        flags=FINAL)
