"""The full-size benchmark folder: real FLUX.1 configs, random bf16 weights built on the device."""

import pytest
import torch

from devtools.full_size import write_full_size_folder
from flux_triton.model_info import load_model_info
from flux_triton.runtime.torch_components import load_component
from flux_triton.specs import component_specs

pytestmark = pytest.mark.fast  # unit tests: no server


def test_full_size_folder_describes_flux1(model_dirs, tmp_path):
    info = load_model_info(write_full_size_folder(tmp_path / "dev", "dev", model_dirs["dev"]))
    assert info.guidance_embeds and info.t5_hidden_size == 4096 and info.clip_hidden_size == 768
    assert (info.default_height, info.default_num_inference_steps) == (1024, 28)
    dit = component_specs(info, "BF16")["dit_transformer"]
    assert dit.input("hidden_states").dims == ("B", "S_img", 64)


def test_small_components_build_with_random_bf16_weights(model_dirs, tmp_path):
    info = load_model_info(write_full_size_folder(tmp_path / "schnell", "schnell", model_dirs["schnell"]))
    clip = load_component("clip_encoder", info, "cpu", "bfloat16")
    params = sum(p.numel() for p in clip.parameters())
    assert 120e6 < params < 125e6 and next(clip.parameters()).dtype == torch.bfloat16
    ids = load_component("tokenizer", info)(["a cat"], ["a cat"], 16)["clip_input_ids"]
    with torch.inference_mode():
        pooled = clip(input_ids=ids)["pooled_prompt_embeds"]
    assert pooled.shape == (1, 768) and torch.isfinite(pooled.float()).all()
    vae = load_component("vae_decoder", info, "cpu", "bfloat16")
    with torch.inference_mode():
        image = vae(latents=torch.randn(1, 16, 4, 4, dtype=torch.bfloat16))["image"]
    assert image.shape == (1, 3, 32, 32)


def test_random_weights_are_the_same_in_every_process(model_dirs, tmp_path):
    """A server and a reference pipeline build the network apart: every parameter (convolutions,
    biases, embeddings too, not only the Linear weights) must come out the same, whatever the
    caller's random state, and loading must leave that state alone."""
    info = load_model_info(write_full_size_folder(tmp_path / "schnell", "schnell", model_dirs["schnell"]))
    torch.manual_seed(1)
    first = load_component("vae_decoder", info, "cpu", "bfloat16").state_dict()
    state = torch.random.get_rng_state()
    torch.rand(7)
    second = load_component("vae_decoder", info, "cpu", "bfloat16").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    torch.manual_seed(1)
    load_component("clip_encoder", info, "cpu", "bfloat16")
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("variant, dit_b, text_b, width", [
    ("flux2-klein-4b", 3.88, 4.02, 7680), ("flux2-klein-9b", 9.08, 8.19, 12288),
    ("flux2-dev", 32.22, 23.34, 15360)])
def test_full_size_flux2_folders_have_the_released_sizes(flux2_dirs, tmp_path, variant, dit_b,
                                                         text_b, width):
    """klein 4B and 9B, and dev (32 B): their DiT and text encoder built on the meta device (no
    memory), parameters in billions as released."""
    from diffusers import Flux2Transformer2DModel

    from devtools.full_size import write_flux2_full_size_folder
    from flux_triton.runtime.torch_components import _text_encoder_class

    folder = write_flux2_full_size_folder(tmp_path / variant, variant, flux2_dirs["klein"].parent)
    info = load_model_info(folder)
    assert info.is_flux2 and info.text_embed_dim == width and info.latent_channels == 32
    with torch.device("meta"):
        dit = Flux2Transformer2DModel.from_config(Flux2Transformer2DModel.load_config(folder / "transformer"))
        encoder_class = _text_encoder_class(folder)
        encoder = encoder_class(encoder_class.config_class.from_pretrained(folder / "text_encoder"))
    assert round(sum(p.numel() for p in dit.parameters()) / 1e9, 2) == dit_b
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e9, 2) == text_b
    tokens = load_component("tokenizer", info)(["a cat"], 512)
    assert tokens["input_ids"].shape == (1, 512)
