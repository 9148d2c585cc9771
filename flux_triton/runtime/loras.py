"""LoRA adapters in a served network, exactly as diffusers' FLUX pipeline applies them.

Every adapter of the catalog is loaded once, with diffusers' own functions (`FluxPipeline.
lora_state_dict`, `load_lora_into_transformer`, `load_lora_into_text_encoder`: peft layers beside
the base weights), and each call then activates the adapters its request names, with their scales,
as `FluxPipeline.set_adapters` does; a call that names none runs the base weights alone (the
adapter layers disabled).
"""

from __future__ import annotations

import torch

from flux_triton.loras import LoraCatalog
from flux_triton.pipeline import Adapters

PARTS = ("transformer", "text_encoder")  # what diffusers' FLUX loader adapts: the DiT and CLIP


class AdapterSwitch:
    """The catalog's adapters loaded into `module` (`part`: transformer or text_encoder), and which
    are active with which scales."""

    def __init__(self, module: torch.nn.Module, part: str, catalog: LoraCatalog):
        from diffusers import FluxPipeline

        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.module, self.part = module, part
        for adapter in catalog.adapters.values():
            if part == "text_encoder" and not adapter.text_encoder:
                continue
            state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
                str(adapter.path.parent), weight_name=adapter.path.name, return_alphas=True,
                return_lora_metadata=True)
            if part == "transformer":
                FluxPipeline.load_lora_into_transformer(
                    state_dict, network_alphas=alphas, transformer=module, adapter_name=adapter.name,
                    metadata=metadata)
            else:
                FluxPipeline.load_lora_into_text_encoder(
                    state_dict, network_alphas=alphas, text_encoder=module, prefix="text_encoder",
                    adapter_name=adapter.name, metadata=metadata)
        # the adapters with layers in this network (one may adapt only the other part)
        self.loaded = frozenset(getattr(module, "peft_config", {}))
        self.active: Adapters | None = None
        self.apply(())

    def apply(self, adapters: Adapters) -> None:
        """Activate `adapters` (name, scale) for the calls that follow; () runs the base weights.
        Adapters without layers here are left out, as peft skips them in diffusers' pipeline."""
        if adapters == self.active or not self.loaded:
            self.active = adapters
            return
        here = tuple((name, scale) for name, scale in adapters if name in self.loaded)
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        names, scales = [n for n, _ in here], [s for _, s in here]
        if self.part == "transformer":
            if here:
                self.module.enable_adapters()
                self.module.set_adapters(names, scales)
            else:
                self.module.disable_adapters()
        elif here:
            enable_lora_for_text_encoder(self.module)
            set_adapters_for_text_encoder(names, self.module, scales)
        else:
            disable_lora_for_text_encoder(self.module)
        self.active = adapters
