"""The FLUX networks and the tokenizers as named-tensor functions, loaded from a model folder.

Used by the Triton component models and by the in-process runner alike: each component maps its
spec's input names to its spec's output names (see `specs.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flux_triton.model_info import FluxModelInfo

# A folder holding this file has configs but no weights (FLUX.1 at full size for benchmarks):
# its networks are built from their configs with random weights, directly on the device. A server
# serves such a folder only when told to (RANDOM_WEIGHTS=1 at export).
RANDOM_WEIGHTS_MARKER = "random_weights.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_tokenizer(model_dir: Path, name: str):
    """Load a tokenizer with the class model_index.json names, as DiffusionPipeline does."""
    import transformers

    _library, class_name = json.loads((model_dir / "model_index.json").read_text())[name]
    return getattr(transformers, class_name).from_pretrained(model_dir / name)


class PromptTokenizer:
    """CLIP and T5 tokenization exactly as FluxPipeline._get_clip/_get_t5_prompt_embeds do it."""

    def __init__(self, model_dir: Path, info: FluxModelInfo):
        self.clip = _load_tokenizer(model_dir, "tokenizer")
        self.t5 = _load_tokenizer(model_dir, "tokenizer_2")
        self.clip_max_length = info.clip_max_length

    def __call__(
        self, prompts: list[str], prompts_2: list[str], max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        clip_ids = self.clip(prompts, padding="max_length", max_length=self.clip_max_length,
                             truncation=True, return_tensors="pt").input_ids
        t5_ids = self.t5(prompts_2, padding="max_length", max_length=max_sequence_length,
                         truncation=True, return_tensors="pt").input_ids
        return {"clip_input_ids": clip_ids, "t5_input_ids": t5_ids}


def _network(cls, model_dir: Path, subfolder: str, dtype: torch.dtype, device: str):
    """`cls` from the folder's weights, or random weights for a folder marked as having none."""
    if has_random_weights(model_dir):
        return random_network(cls, model_dir / subfolder, device, dtype)
    return cls.from_pretrained(model_dir / subfolder, dtype=dtype)


def has_random_weights(model_dir: Path) -> bool:
    return (Path(model_dir) / RANDOM_WEIGHTS_MARKER).exists()


def random_network(cls, config_dir: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """`cls` built from its config on `device` in `dtype`, Linear weights ~ N(0, 0.02).

    Every parameter is a function of the config alone: the default initialisation (biases,
    embeddings, convolutions) runs from a fixed seed, so a server process and a reference
    pipeline in another process hold the same network."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    target = torch.device(device)
    cuda_devices = [target.index or 0] if target.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.device(device):
            torch.random.default_generator.manual_seed(0)
            for index in cuda_devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(0)
            if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):
                model = cls.from_config(cls.load_config(config_dir))  # diffusers
            else:
                model = cls(cls.config_class.from_pretrained(config_dir))  # transformers
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.02, generator=generator)
    return model.to(device=device, dtype=dtype).eval()


class ClipEncoder(torch.nn.Module):
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from transformers import CLIPTextModel

        self.model = _network(CLIPTextModel, model_dir, "text_encoder", dtype, device)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(input_ids, output_hidden_states=False)
        return {"pooled_prompt_embeds": out.pooler_output.to(self.model.dtype)}


class T5Encoder(torch.nn.Module):
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from transformers import T5EncoderModel

        self.model = _network(T5EncoderModel, model_dir, "text_encoder_2", dtype, device)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.model(input_ids, output_hidden_states=False)[0]
        return {"prompt_embeds": hidden.to(self.model.dtype)}


class DitTransformer(torch.nn.Module):
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.model = _network(FluxTransformer2DModel, model_dir, "transformer", dtype, device)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                img_ids, txt_ids, guidance=None, cache_threshold=None, cache_head_residual=None,
                cache_tail_residual=None, cache_tail_encoder_residual=None) -> dict[str, torch.Tensor]:
        if cache_threshold is not None:
            return self.cached_forward(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
                txt_ids, guidance, float(cache_threshold.reshape(-1)[0]), cache_head_residual,
                cache_tail_residual, cache_tail_encoder_residual)
        noise_pred = self.model(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return {"noise_pred": noise_pred}

    def cached_forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                       img_ids, txt_ids, guidance, threshold: float, head_residual, tail_residual,
                       tail_encoder_residual) -> dict[str, torch.Tensor]:
        """FluxTransformer2DModel.forward under diffusers' first-block cache
        (`FirstBlockCacheConfig(threshold)`, its hooks' arithmetic), with the cache's state passed
        in and out instead of held by the model: each request carries its own."""
        model = self.model
        hidden = model.x_embedder(hidden_states)
        timestep = timestep.to(hidden.dtype) * 1000
        if guidance is None:
            temb = model.time_text_embed(timestep, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
        encoder = model.context_embedder(encoder_hidden_states)
        rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        def run(block, hidden, encoder):
            encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                                    image_rotary_emb=rotary, joint_attention_kwargs=None)
            return hidden, encoder

        head, *rest = [*model.transformer_blocks, *model.single_transformer_blocks]
        head_hidden, head_encoder = run(head, hidden, encoder)
        residual = head_hidden - hidden
        computed = head_residual is None or (
            (residual - head_residual).abs().mean() / head_residual.abs().mean()).item() > threshold
        if computed:
            hidden, encoder = head_hidden, head_encoder
            for block in rest:
                hidden, encoder = run(block, hidden, encoder)
            head_residual, tail_residual = residual, hidden - head_hidden
            tail_encoder_residual = encoder - head_encoder
        else:  # the other blocks' residual of the last step that ran them
            hidden = tail_residual + head_hidden
        noise_pred = model.proj_out(model.norm_out(hidden, temb))
        return {"noise_pred": noise_pred, "cache_head_residual": head_residual,
                "cache_tail_residual": tail_residual,
                "cache_tail_encoder_residual": tail_encoder_residual,
                "cache_computed": torch.full((hidden.shape[0],), computed, device=hidden.device)}


class VaeDecoder(torch.nn.Module):
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from diffusers import AutoencoderKL

        self.model = _network(AutoencoderKL, model_dir, "vae", dtype, device)
        self.channels_last = False  # set when the decoder's convolutions run channels_last

    def forward(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        return {"image": self.model.decode(latents, return_dict=False)[0]}


class VaeEncoder(torch.nn.Module):
    """The VAE's encoder and its latent normalisation: a sample of the posterior at `noise` (its
    standard-normal draw; zeros give the mean), shifted and scaled as the FLUX pipelines do."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from diffusers import AutoencoderKL
        self.model = _network(AutoencoderKL, model_dir, "vae", dtype, device)
        self.model.decoder = None  # the decoder is the vae_decoder network's; not held twice
        self.model.post_quant_conv = None

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        # channels_last, as diffusers' image processor hands images over (a transposed HWC
        # array): the convolutions then round as they do in the diffusers pipelines
        image = image.contiguous(memory_format=torch.channels_last)
        posterior = self.model.encode(image, return_dict=False)[0]
        latents = posterior.mean + posterior.std * noise  # DiagonalGaussianDistribution.sample
        config = self.model.config
        return {"latents": (latents - config.shift_factor) * config.scaling_factor}


class ChatTokenizer:
    """FLUX.2's tokenization: the prompt in its text encoder's chat template, padded to
    `max_sequence_length`, exactly as Flux2KleinPipeline (one user turn, thinking off) and
    Flux2Pipeline (its system message, then the user turn) tokenize it."""

    def __init__(self, model_dir: Path, info: FluxModelInfo):
        self.tokenizer = _load_tokenizer(model_dir, "tokenizer")
        self.with_system_message = info.pipeline_class == "Flux2Pipeline"

    def __call__(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        if self.with_system_message:
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            tokens = self.tokenizer.apply_chat_template(
                format_input(prompts=list(prompts)), add_generation_prompt=False, tokenize=True,
                return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
                max_length=max_sequence_length)
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        ids, masks = [], []
        for prompt in prompts:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                enable_thinking=False)
            tokens = self.tokenizer(text, return_tensors="pt", padding="max_length",
                                    truncation=True, max_length=max_sequence_length)
            ids.append(tokens["input_ids"])
            masks.append(tokens["attention_mask"])
        return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}


def _text_encoder_class(model_dir: Path):
    import transformers

    _library, class_name = json.loads((model_dir / "model_index.json").read_text())["text_encoder"]
    return getattr(transformers, class_name)


class TextEncoder(torch.nn.Module):
    """FLUX.2's text encoder: the hidden states of `info.text_encoder_layers`, stacked per token
    into [N, S, layers x D] as the pipelines' `_get_*_prompt_embeds` do. The language model runs
    without its head and only up to the last layer read: the earlier layers' states do not
    depend on what follows them."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu",
                 layers: tuple[int, ...] = ()):
        super().__init__()
        self.model = _network(_text_encoder_class(model_dir), model_dir, "text_encoder", dtype,
                              device)
        self.layers = layers
        decoder = self.language_model()
        # keeps a layer past the last one read: the last hidden state is normalised, the others not
        decoder.layers = decoder.layers[:max(layers) + 1]

    def language_model(self) -> torch.nn.Module:
        base = self.model.model  # Qwen3Model, or Mistral3Model holding the vision tower too
        return getattr(base, "language_model", base)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        output = self.language_model()(input_ids=input_ids, attention_mask=attention_mask,
                                       output_hidden_states=True, use_cache=False)
        out = torch.stack([output.hidden_states[k] for k in self.layers], dim=1)
        out = out.to(dtype=self.model.dtype)
        batch, channels, seq_len, hidden = out.shape
        return {"prompt_embeds": out.permute(0, 2, 1, 3).reshape(batch, seq_len, channels * hidden)}


class Flux2DitTransformer(torch.nn.Module):
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from diffusers import Flux2Transformer2DModel

        self.model = _network(Flux2Transformer2DModel, model_dir, "transformer", dtype, device)

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids,
                guidance=None) -> dict[str, torch.Tensor]:
        noise_pred = self.model(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                                encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids,
                                img_ids=img_ids, return_dict=False)[0]
        return {"noise_pred": noise_pred}


class Flux2VaeDecoder(torch.nn.Module):
    """FLUX.2's VAE decoder from the pipeline's patched, normalised latents [B, C*4, h, w]: the
    batch-norm statistics undone, the 2x2 patches unfolded, then decoded."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from diffusers import AutoencoderKLFlux2

        self.model = _network(AutoencoderKLFlux2, model_dir, "vae", dtype, device)
        self.model.encoder = None  # the vae_encoder network's
        self.model.quant_conv = None
        self.channels_last = False

    def forward(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        from flux_triton.sampling import flux2_denormalise, unpatchify_latents

        bn = self.model.bn
        latents = unpatchify_latents(flux2_denormalise(
            latents, bn.running_mean, bn.running_var, self.model.config.batch_norm_eps))
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        return {"image": self.model.decode(latents, return_dict=False)[0]}


class Flux2VaeEncoder(torch.nn.Module):
    """FLUX.2's VAE encoder as its pipelines encode reference images: the posterior's mode,
    patched 2x2 and normalised by the batch-norm statistics."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        from diffusers import AutoencoderKLFlux2

        self.model = _network(AutoencoderKLFlux2, model_dir, "vae", dtype, device)
        self.model.decoder = None
        self.model.post_quant_conv = None

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        from flux_triton.sampling import flux2_normalise, patchify_latents

        # channels_last, as the image processor hands images over (see VaeEncoder)
        image = image.contiguous(memory_format=torch.channels_last)
        latents = patchify_latents(self.model.encode(image, return_dict=False)[0].mode())
        bn = self.model.bn
        return {"latents": flux2_normalise(latents, bn.running_mean, bn.running_var,
                                           self.model.config.batch_norm_eps)}


NETWORK_CLASSES = {
    "clip_encoder": ClipEncoder,
    "t5_encoder": T5Encoder,
    "dit_transformer": DitTransformer,
    "vae_decoder": VaeDecoder,
    "vae_encoder": VaeEncoder,
}
FLUX2_NETWORK_CLASSES = {
    "text_encoder": TextEncoder,
    "dit_transformer": Flux2DitTransformer,
    "vae_decoder": Flux2VaeDecoder,
    "vae_encoder": Flux2VaeEncoder,
}


def load_component(name: str, info: FluxModelInfo, device: str = "cpu", dtype: str = "float32"):
    """Load one served component (`tokenizer` or a network) from the model folder."""
    if name == "tokenizer":
        return ChatTokenizer(info.model_dir, info) if info.is_flux2 else PromptTokenizer(info.model_dir, info)
    classes = FLUX2_NETWORK_CLASSES if info.is_flux2 else NETWORK_CLASSES
    if name not in classes:
        raise KeyError(f"unknown component {name!r}; expected tokenizer or one of {sorted(classes)}")
    if name == "text_encoder":
        network = TextEncoder(info.model_dir, DTYPES[dtype], device, info.text_encoder_layers)
    else:
        network = classes[name](info.model_dir, DTYPES[dtype], device)
    return network.to(device).eval()
