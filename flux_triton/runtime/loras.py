"""LoRA adapters in a served network, as diffusers' FLUX pipeline applies them.

Every adapter of the catalog is loaded once with diffusers' own functions (`FluxPipeline.
lora_state_dict`, `load_lora_into_transformer`, `load_lora_into_text_encoder`), which convert
kohya, xlabs and BFL keys and place peft layers beside the base weights. Then one of two ways:

- `AdapterSwitch` keeps the peft layers and activates a call's adapters with their scales as
  `FluxPipeline.set_adapters` does: the images are diffusers' bit for bit (CPU, eager GPU).
- `MergedAdapters` takes each layer's low-rank factors out of the peft layers, removes those
  layers again, and writes W = W_base + sum(scale * B @ A) into the weights in place, from a kept
  copy of the base weights (requantized for float8 layers). The network's code and its tensors'
  addresses never change, so compiled graphs and captured CUDA graphs stay valid and a step costs
  what it costs without adapters (compile, CUDA graphs, FP8).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from flux_triton.loras import LoraCatalog
from flux_triton.pipeline import Adapters
from flux_triton.runtime.float8 import Float8Rows, is_float8, quantize_rows

PARTS = ("transformer", "text_encoder")  # what diffusers' FLUX loader adapts: the DiT and CLIP


def load_adapters(module: torch.nn.Module, part: str, catalog: LoraCatalog) -> frozenset[str]:
    """Load every adapter of `catalog` into `module` (`part`: transformer or text_encoder) with
    diffusers' loader; returns the names of those with layers in it (one may adapt only the other
    part)."""
    from diffusers import FluxPipeline

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
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
    return frozenset(getattr(module, "peft_config", {}))


def _present(adapters: Adapters, loaded: frozenset[str]) -> Adapters:
    """The adapters with layers here; the others are left out, as peft skips them in diffusers."""
    return tuple((name, scale) for name, scale in adapters if name in loaded)


class AdapterSwitch:
    """The catalog's adapters as peft layers in `module`, and which are active with which scales."""

    def __init__(self, module: torch.nn.Module, part: str, catalog: LoraCatalog):
        self.module, self.part = module, part
        self.loaded = load_adapters(module, part, catalog)
        self.active: Adapters | None = None
        self.apply(())

    def apply(self, adapters: Adapters) -> None:
        """Activate `adapters` (name, scale) for the calls that follow; () runs the base weights."""
        if adapters == self.active or not self.loaded:
            self.active = adapters
            return
        here = _present(adapters, self.loaded)
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


@dataclass(frozen=True)
class LowRank:
    """One adapter's update of one Linear layer: delta W = scaling * up @ down."""

    down: torch.Tensor  # lora_A [rank, in]
    up: torch.Tensor  # lora_B [out, rank]
    scaling: float  # lora_alpha / rank, as peft computes it


def extract_low_rank(module: torch.nn.Module, part: str,
                     catalog: LoraCatalog) -> dict[str, dict[str, LowRank]]:
    """Every adapter's factors by layer name (then adapter name), read from the peft layers
    diffusers' loader makes; the peft layers are removed again, leaving `module` as it was."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.lora import LoraLayer

    load_adapters(module, part, catalog)
    layers: dict[str, dict[str, LowRank]] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        embedding = getattr(layer, "lora_embedding_A", None)
        if not isinstance(layer.get_base_layer(), torch.nn.Linear) or embedding:
            raise ValueError(f"LoRA adapts {name}, not a Linear layer: only Linear layers can be merged")
        for adapter in layer.lora_A:
            if layer.use_dora.get(adapter) or getattr(layer, "lora_bias", {}).get(adapter):
                raise ValueError(f"LoRA {adapter}: DoRA and LoRA biases cannot be merged ({name})")
            if layer.fan_in_fan_out:
                raise ValueError(f"LoRA {adapter}: {name} stores its weight transposed")
            layers.setdefault(name, {})[adapter] = LowRank(
                layer.lora_A[adapter].weight.detach().clone(),
                layer.lora_B[adapter].weight.detach().clone(), float(layer.scaling[adapter]))
    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False
    return layers


@functools.cache
def fused_quantize_rows():
    """`quantize_rows` compiled: one kernel reads each row for its maximum and again to quantize
    it (torchao's eager version spends several float32 copies of the weight)."""
    return torch.compile(quantize_rows, dynamic=False)


class MergedAdapters:
    """A call's adapters merged into the weights of `module`, in place.

    Made from the loaded network before it is quantized or compiled (it keeps a copy of each
    adapted layer's base weights), used after. W = W_base + sum over adapters of
    (scale * scaling) * B @ A, in one addmm per layer; a float8 layer is requantized from that row
    by row (`quantize_rows`, compiled). Without adapters a layer holds its base weights again, bit
    for bit (float8 layers: their first quantization, kept at the first merge).

    After `prepare_slots(k)` a call's adapters (up to k) are copied into fixed slot buffers, two
    kernels each, and one merge program per number of adapters rewrites every adapted layer from
    the slots: on a GPU a captured CUDA graph, so a switch costs the GPU's time, not a Python loop
    over hundreds of layers. Otherwise (or beyond k adapters) `apply` rewrites layer by layer. With
    adapters active, the slot programs also requantize the float8 layers the call's adapters do
    not touch (from their bf16 base, by `quantize_rows`); without adapters every layer is its base.
    """

    def __init__(self, module: torch.nn.Module, part: str, catalog: LoraCatalog):
        self.module = module
        self.moved: dict[str, tuple[str, int, int]] = {}
        self.low_rank = extract_low_rank(module, part, catalog)
        self.base = {name: self.weight(name).detach().clone() for name in self.low_rank}
        self.float8_base: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.loaded = frozenset(a for factors in self.low_rank.values() for a in factors)
        self.merged: set[str] = set()  # layers that hold an update now
        self.active: Adapters | None = ()
        self.slots: _Slots | None = None

    def follow(self, moved: dict[str, tuple[str, int, int]]) -> None:
        """Adapted layers now held as rows of a fused one (`acceleration.fuse_qkv`): name ->
        (fused layer, first row, row past the last)."""
        self.moved = {name: moved[name] for name in self.low_rank if name in moved}

    def weight(self, name: str) -> torch.Tensor | Float8Rows:
        """Layer `name`'s weight as it is now (quantizing may have replaced the Parameter): its
        rows of the fused layer that holds it, if one does."""
        if name not in self.moved:
            return self.module.get_submodule(name).weight
        fused, start, stop = self.moved[name]
        weight = self.module.get_submodule(fused).weight
        if not is_float8(weight):
            return weight.detach()[start:stop]
        _check_row_wise(fused, weight)
        return Float8Rows(weight.qdata[start:stop], weight.scale[start:stop])

    def apply(self, adapters: Adapters) -> None:
        """Merge `adapters` (name, scale) into the weights for the calls that follow."""
        here = _present(adapters, self.loaded)
        if here == self.active:
            return
        self.active = None  # until the switch is complete: a failed one is redone by the next call
        # always in inference mode: the compiled requantization is then never compiled again
        with torch.inference_mode():
            if self.slots is not None and len(here) <= self.slots.count:
                for slot, (name, scale) in enumerate(here):
                    self.slots.fill(slot, name, scale)
                self.merged = set(self.low_rank)  # from here on any layer may hold an update
                self.slots.run(len(here))
                if not here:
                    self.merged = set()
            else:
                self._apply_by_layer(here)
        self.active = here

    def _apply_by_layer(self, here: Adapters) -> None:
        for name, factors in self.low_rank.items():
            chosen = [(factors[a], scale) for a, scale in here if a in factors]
            if chosen:
                up = torch.cat([(f.up * f.scaling) * scale for f, scale in chosen], dim=1)
                down = torch.cat([f.down for f, _ in chosen], dim=0)
                self._write(name, up, down)
                self.merged.add(name)
            elif name in self.merged:
                self._write(name, None, None)
                self.merged.discard(name)

    def _write(self, name: str, up: torch.Tensor | None, down: torch.Tensor | None) -> None:
        """Layer `name` := base + up @ down (None: its base)."""
        weight, base = self.weight(name), self.base[name]
        if not is_float8(weight):
            if up is None:
                weight.copy_(base)
            else:
                torch.addmm(base, up, down, out=weight)
            return
        if name not in self.float8_base:  # not merged yet: what quantize_ made of the base
            _check_row_wise(name, weight)
            self.float8_base[name] = (weight.qdata.clone(), weight.scale.clone())
        if up is None:
            data, scale = self.float8_base[name]
        else:
            data, scale = fused_quantize_rows()(torch.addmm(base, up, down))
        weight.qdata.copy_(data)
        weight.scale.copy_(scale.view_as(weight.scale))

    def memory_bytes(self) -> int:
        """GPU memory this keeps beside the network: base copies, factors, slot buffers."""
        tensors = list(self.base.values()) + [t for pair in self.float8_base.values() for t in pair]
        tensors += [t for factors in self.low_rank.values() for f in factors.values() for t in (f.down, f.up)]
        if self.slots is not None:
            tensors += self.slots.buffers()
        return sum(t.numel() * t.element_size() for t in tensors)

    def prepare_slots(self, count: int) -> None:
        """Slots for up to `count` adapters per call and their merge programs (captured as CUDA
        graphs on a GPU). Call after quantizing and compiling, with the base weights in place."""
        with torch.inference_mode():
            for name in self.low_rank:  # keep each float8 base before any merge
                self._write(name, None, None)
            self.slots = _Slots(self, min(count, len(self.loaded)))
            self.merged, self.active = set(), ()


def _check_row_wise(name: str, weight) -> None:
    if list(weight.block_size) != [1, weight.shape[-1]] or weight.qdata.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: only row-wise e4m3 float8 weights can take adapters")


class _Slots:
    """Fixed buffers a call's adapters are copied into, and the programs that merge from them.

    Slot j holds one adapter's factors for every adapted layer, in one flat buffer for the ups
    (B * scaling * scale, transposed) and one for the downs (A), zero where that adapter has no
    layer or a smaller rank. Program k copies slots 0..k-1 of each layer side by side and merges
    them in one addmm; program 0 restores the base weights.
    """

    def __init__(self, owner: MergedAdapters, count: int):
        self.owner, self.count = owner, count
        self.rank = max(f.down.shape[0] for factors in owner.low_rank.values() for f in factors.values())
        self.layout: dict[str, tuple[int, int, int, int]] = {}  # name -> up offset, down offset, out, in
        up_size = down_size = 0
        for name in owner.low_rank:
            fan_out, fan_in = owner.base[name].shape
            self.layout[name] = (up_size, down_size, fan_out, fan_in)
            up_size += self.rank * fan_out
            down_size += self.rank * fan_in
        base = next(iter(owner.base.values()))
        options = dict(device=base.device, dtype=base.dtype)
        self.up = torch.zeros(count, up_size, **options)
        self.down = torch.zeros(count, down_size, **options)
        self.adapter_up = {a: torch.zeros(up_size, **options) for a in sorted(owner.loaded)}
        self.adapter_down = {a: torch.zeros(down_size, **options) for a in sorted(owner.loaded)}
        for name, factors in owner.low_rank.items():
            for adapter, factor in factors.items():
                rank = factor.down.shape[0]
                self._up(self.adapter_up[adapter], name)[:rank].copy_((factor.up * factor.scaling).T)
                self._down(self.adapter_down[adapter], name)[:rank].copy_(factor.down)
        self.side_by_side = {name: (torch.zeros(count * self.rank, out, **options),
                                    torch.zeros(count * self.rank, fan_in, **options))
                             for name, (_, _, out, fan_in) in self.layout.items()}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if base.is_cuda:
            self._capture(base.device)

    def buffers(self) -> list[torch.Tensor]:
        return ([self.up, self.down, *self.adapter_up.values(), *self.adapter_down.values()]
                + [t for pair in self.side_by_side.values() for t in pair])

    def _up(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        offset, _, fan_out, _ = self.layout[name]
        return flat[offset:offset + self.rank * fan_out].view(self.rank, fan_out)

    def _down(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        _, offset, _, fan_in = self.layout[name]
        return flat[offset:offset + self.rank * fan_in].view(self.rank, fan_in)

    def fill(self, slot: int, adapter: str, scale: float) -> None:
        torch.mul(self.adapter_up[adapter], scale, out=self.up[slot])
        self.down[slot].copy_(self.adapter_down[adapter])

    def program(self, adapters: int) -> None:
        """Merge slots 0..adapters-1 into every adapted layer (0: restore the base weights)."""
        for name in self.layout:
            if adapters == 0:
                self.owner._write(name, None, None)
                continue
            ups, downs = self.side_by_side[name]
            for slot in range(adapters):
                rows = slice(slot * self.rank, (slot + 1) * self.rank)
                ups[rows].copy_(self._up(self.up[slot], name))
                downs[rows].copy_(self._down(self.down[slot], name))
            used = adapters * self.rank
            self.owner._write(name, ups[:used].T, downs[:used])

    def run(self, adapters: int) -> None:
        if adapters in self.graphs:
            self.graphs[adapters].replay()
        else:
            self.program(adapters)

    def _capture(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device):
            for adapters in range(self.count + 1):
                with torch.cuda.stream(side):
                    self.program(adapters)  # compiles the requantization for each shape first
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    self.program(adapters)
                self.graphs[adapters] = graph
            self.graphs[0].replay()
            torch.cuda.synchronize(device)
