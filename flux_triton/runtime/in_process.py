"""The pipeline run in-process on torch modules: the reference the served path is measured against."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import torch

from flux_triton.loras import LoraCatalog
from flux_triton.model_info import FluxModelInfo
from flux_triton.pipeline import Adapters, FinalImage, StepUpdate, generate
from flux_triton.request import GenerationRequest
from flux_triton.runtime.acceleration import ADAPTED_PARTS, Acceleration, load_network
from flux_triton.runtime.loras import AdapterSwitch
from flux_triton.runtime.torch_components import load_component
from flux_triton.specs import TORCH_DTYPES, ServingShape, components


class TorchFluxModels:
    """`FluxModels` implemented by direct calls of the loaded components; with `loras`, those
    LoRA adapters applied as the served networks apply them."""

    def __init__(self, info: FluxModelInfo, device: str = "cpu", dtype: str = "float32",
                 acceleration: Acceleration | None = None, warmup: tuple[ServingShape, ...] = (),
                 loras: LoraCatalog | None = None, sequence_parallel: tuple[str, ...] = ()):
        names = components(info)
        self.load_phases: dict[str, dict] = {n: {} for n in names}  # seconds, cache counters
        self.adapters = {}
        if sequence_parallel:  # the DiT over a group of ranks, as the served one runs it
            acceleration = acceleration or Acceleration(
                next(p for p, name in TORCH_DTYPES.items() if name == dtype))
        if acceleration is None:
            self.parts = {n: load_component(n, info, device, dtype) for n in names}
            if loras is not None and loras.adapters:
                self.adapters = {name: AdapterSwitch(self.parts[name].model, part, loras)
                                 for name, part in ADAPTED_PARTS.items()}
        else:  # exactly as the served component models load them
            networks = {n: load_network(n, info, device, acceleration, warmup, self.load_phases[n],
                                        loras, sequence_parallel) for n in names}
            self.parts = {n: network.run for n, network in networks.items()}
            self.adapters = {n: network.adapters for n, network in networks.items()
                             if network.adapters is not None}
        self.device = device

    def _adapt(self, name: str, adapters: Adapters) -> None:
        if name in self.adapters:
            self.adapters[name].apply(adapters)
        elif adapters:
            raise ValueError(f"no LoRA adapters were loaded, asked for {[n for n, _ in adapters]}")

    async def tokenize(self, prompts, prompts_2, max_sequence_length):
        ids = self.parts["tokenizer"](list(prompts), list(prompts_2), max_sequence_length)
        return ids["clip_input_ids"].to(self.device), ids["t5_input_ids"].to(self.device)

    async def tokenize_chat(self, prompts, max_sequence_length):
        ids = self.parts["tokenizer"](list(prompts), max_sequence_length)
        return ids["input_ids"].to(self.device), ids["attention_mask"].to(self.device)

    async def text_encoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", "prompt_embeds", input_ids=input_ids,
                         attention_mask=attention_mask)

    def _outputs(self, name: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return self.parts[name](**inputs)

    def _run(self, name: str, output: str, **inputs: torch.Tensor) -> torch.Tensor:
        return self._outputs(name, **inputs)[output]

    async def clip_encoder(self, input_ids: torch.Tensor, adapters: Adapters = ()) -> torch.Tensor:
        self._adapt("clip_encoder", adapters)
        return self._run("clip_encoder", "pooled_prompt_embeds", input_ids=input_ids)

    async def t5_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("t5_encoder", "prompt_embeds", input_ids=input_ids)

    async def dit_transformer(self, inputs: dict[str, torch.Tensor],
                              adapters: Adapters = ()) -> torch.Tensor:
        self._adapt("dit_transformer", adapters)
        return self._run("dit_transformer", "noise_pred", **inputs)

    async def dit_transformer_cached(self, inputs: dict[str, torch.Tensor],
                                     adapters: Adapters = ()) -> dict[str, torch.Tensor]:
        self._adapt("dit_transformer", adapters)
        return self._outputs("dit_transformer", **inputs)

    async def vae_decoder(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", "image", latents=latents)

    async def vae_encoder(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:  # FLUX.2's encoder takes the image alone
            return self._run("vae_encoder", "latents", image=image)
        return self._run("vae_encoder", "latents", image=image, noise=noise)


def run_in_process(
    request: GenerationRequest, info: FluxModelInfo, models: TorchFluxModels
) -> Iterator[StepUpdate | FinalImage]:
    """Run the shared pipeline synchronously, yielding each step and then the image."""
    loop = asyncio.new_event_loop()
    stream = generate(request, info, models)
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()
