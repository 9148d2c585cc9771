"""The trained default model (models/shapes-flux): served exactly as diffusers runs it, drawing what
its captions say, and the training script that made it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from devtools.shapes import PALETTE, Scene, all_scenes, classify
from flux_triton.clients import stream_client
from flux_triton.model_info import load_model_info
from tests.reference import SHAPES_DIR, assert_served_matches_diffusers, served_generate

DEMO_PROMPT = "a red circle on a blue background"
WEIGHT_FILES = ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                "transformer/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors")


def test_folder_records_its_trained_defaults_and_is_small():
    info = load_model_info(SHAPES_DIR)
    assert (info.default_height, info.default_width) == (128, 128)
    assert info.default_max_sequence_length == 16
    assert info.default_num_inference_steps == 12
    sizes = {name: (SHAPES_DIR / name).stat().st_size for name in WEIGHT_FILES}
    print(f"\nshapes-flux weights: {sum(sizes.values()) / 1e6:.1f} MB {sizes}")
    assert sum(sizes.values()) < 25e6
    log = json.loads((SHAPES_DIR / "training_log.json").read_text())
    assert log["runs"] and log["runs"][-1]["transformer"]["steps"] > 0


def test_tokenizers_give_one_token_per_caption_word():
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(SHAPES_DIR / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(SHAPES_DIR / "tokenizer_2")
    words = {word for scene in all_scenes() for word in scene.caption.split()}
    assert {w: len(clip.tokenize(w)) for w in words} == dict.fromkeys(words, 1)
    assert {w: len(t5.tokenize(w)) for w in words} == dict.fromkeys(words, 1)


@pytest.mark.parametrize("fields", [
    dict(prompt=DEMO_PROMPT, seed=0),
    dict(prompt=["a green triangle on a white background", "a yellow square on a purple background"],
         num_images_per_prompt=2, seed=5, num_inference_steps=6),
], ids=["demo request", "2 prompts x 2 images"])
def test_served_shapes_identical_to_diffusers(served_shapes, shapes_pipe, fields):
    assert_served_matches_diffusers(served_shapes, shapes_pipe, fields, "shapes-flux")


def _share_near(image: np.ndarray, colour: str, tolerance: float = 60.0) -> float:
    distance = np.linalg.norm(image.astype(float) - np.array(PALETTE[colour], dtype=float), axis=-1)
    return float((distance < tolerance).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_red_circle_on_blue_background(served_shapes, seed):
    """Served at the model's defaults: mostly blue, with one red round blob."""
    result = served_generate(served_shapes, dict(prompt=DEMO_PROMPT, seed=seed))
    assert result.error is None, result.error
    image = result.image[0]
    blue, red = _share_near(image, "blue"), _share_near(image, "red")
    print(f"\nseed {seed}: blue {blue:.0%}, red {red:.0%}, read as {classify(image)}")
    assert blue > 0.5 and 0.08 < red < 0.45
    assert classify(image) == Scene("circle", "red", "blue")


@pytest.mark.parametrize("decoder,kind", [("vae", "x0"), ("linear", "latent")])
def test_client_saves_a_preview_strip_that_converges(served_shapes, tmp_path, decoder, kind):
    """The demo's strip (x0 previews, the client's default, decoded by the server's VAE) and the
    cheapest one (raw latents through the linear map) both close in on the image."""
    code = stream_client.main(["--url", served_shapes.url, "--prompt", DEMO_PROMPT, "--seed", "0",
                               "--out", str(tmp_path), "--show", "never",
                               "--preview-decoder", decoder, "--preview-kind", kind])
    assert code == 0
    strip = np.array(Image.open(tmp_path / "preview_strip_0.png"))
    gif = Image.open(tmp_path / "previews_0.gif")
    steps = served_shapes.info.default_num_inference_steps
    assert strip.shape == (128, 128 * (steps + 1), 3)
    assert gif.n_frames in (steps, steps + 1)  # GIF writers merge a last preview equal to the image
    frames = [strip[:, i * 128:(i + 1) * 128].astype(float) for i in range(steps + 1)]
    distance = [np.abs(frame - frames[-1]).mean() for frame in frames[:-1]]
    print(f"\n{kind} previews ({decoder}), mean distance to the image by step: "
          f"{[round(d, 1) for d in distance]}")
    if kind == "latent":
        assert all(later < earlier for earlier, later in zip(distance, distance[1:]))
    else:  # x0: the model's guess; once it has the picture (step 3 of 12), only closer
        assert all(later < earlier for earlier, later in zip(distance[2:], distance[3:]))
        assert distance[3] < distance[0] / 2
        assert distance[-1] == 0  # the last step's x0 is the final latents: the image itself


def test_training_smoke_run_writes_a_loadable_model(tmp_path):
    """`make train-default` on a CPU, cut to a few steps at 32 px: a complete diffusers folder."""
    from diffusers import FluxPipeline

    from devtools.train_shapes import main

    out = tmp_path / "shapes-smoke"
    main(["--out", str(out), "--device", "cpu", "--size", "32", "--vae-steps", "3",
          "--vae-batch", "4", "--dit-steps", "3", "--dit-batch", "4", "--images-per-caption", "1"])
    info = load_model_info(out)
    assert (info.default_height, info.default_max_sequence_length) == (32, 16)
    assert info.scheduler.shift == 3.0 and info.vae_scaling_factor != 1.0
    run = json.loads((out / "training_log.json").read_text())["runs"][-1]
    assert info.vae_scaling_factor == run["vae"]["scaling_factor"]  # the fitted normalisation
    for name in WEIGHT_FILES:
        assert {t.dtype for t in load_file(out / name).values()} == {torch.float16}, name
    assert run["vae"]["steps"] == 3 and run["transformer"]["steps"] == 3
    assert np.isfinite(run["transformer"]["final_loss"])
    pipe = FluxPipeline.from_pretrained(out, dtype=torch.float32)
    assert pipe.transformer.dtype == torch.float32
    image = pipe("a red circle on a blue background", height=32, width=32, num_inference_steps=2,
                 max_sequence_length=16, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_lora_training_smoke_run_writes_a_servable_adapter(tmp_path):
    """`make train-lora` on a CPU, cut to a few steps: an adapter diffusers loads and the catalog
    lists (rank, DiT layers only)."""
    from diffusers import FluxPipeline

    from devtools.train_lora import main
    from flux_triton.loras import read_adapter

    out = tmp_path / "outline"
    main(["--out", str(out), "--device", "cpu", "--steps", "3", "--batch", "4",
          "--images-per-caption", "1"])
    adapter = read_adapter(out)
    assert (adapter.rank, adapter.key_format, adapter.text_encoder) == (16, "diffusers", False)
    assert {"attn.to_q", "proj_mlp", "ff.net.2"} <= set(adapter.targets)
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 3 and np.isfinite(log["final_loss"])
    pipe = FluxPipeline.from_pretrained(SHAPES_DIR, dtype=torch.float32)
    pipe.load_lora_weights(str(out), adapter_name="outline")
    assert "outline" in pipe.transformer.peft_config


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_served_outline_adapter_equals_diffusers(served_shapes, scale):
    """The committed `outline` adapter, served (the default model's LORA_DIR): diffusers'
    FluxPipeline after `load_lora_weights` + `set_adapters`, bit for bit; at full scale the
    shapes come out as outlines."""
    from diffusers import FluxPipeline

    from flux_triton.request import validate_request
    from tests.reference import diffusers_image, raw_inputs

    fields = dict(prompt=[DEMO_PROMPT, "a green triangle on a white background"], seed=0)
    result = served_generate(served_shapes, dict(fields, lora=["outline"], lora_scale=[scale]))
    assert result.error is None, result.error
    pipe = FluxPipeline.from_pretrained(SHAPES_DIR, dtype=torch.float32)
    pipe.load_lora_weights(str(SHAPES_DIR / "loras" / "outline"), adapter_name="outline")
    pipe.set_adapters(["outline"], [scale])
    expected = diffusers_image(pipe, validate_request(raw_inputs(**fields), load_model_info(SHAPES_DIR)))[0]
    found = [classify(image) for image in result.image]
    print(f"\noutline at scale {scale}: read as {found}")
    assert np.array_equal(result.image, expected)
    if scale == 1.0:
        assert all(scene is not None and scene.outline for scene in found)


def test_training_sigmas_shift_moves_the_draws_towards_noise():
    """`--sigma-shift` applies the scheduler's time shift to the logit-normal draws: shift 1 keeps
    them, shift 3 draws sigmas above 0.9 about ten times as often (the steps that set the layout)."""
    from devtools.train_shapes import training_sigmas

    plain = training_sigmas(20000, torch.Generator().manual_seed(0))
    shifted = training_sigmas(20000, torch.Generator().manual_seed(0), 3.0)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    assert 0 < shifted.min() and shifted.max() < 1
    assert (plain > 0.9).float().mean() < 0.03 < 0.1 < (shifted > 0.9).float().mean()
