"""Write the serving model repository for a FLUX model folder (`make export`)."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path

from export.pbtxt import ensemble_config, python_model_config
from flux_triton.components import load_component
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.preview import PreviewProjection, fit_preview_projection
from flux_triton.request import ServingLimits
from flux_triton.specs import bls_spec, component_specs

SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
COMPONENTS = ("tokenizer", "clip_encoder", "t5_encoder", "dit_transformer", "vae_decoder")
ENCODE_STEPS = [
    ("tokenizer",
     {"prompt": "prompt", "prompt_2": "prompt_2", "max_sequence_length": "max_sequence_length"},
     {"clip_input_ids": "clip_input_ids", "t5_input_ids": "t5_input_ids"}),
    ("clip_encoder", {"input_ids": "clip_input_ids"}, {"pooled_prompt_embeds": "pooled_prompt_embeds"}),
    ("t5_encoder", {"input_ids": "t5_input_ids"}, {"prompt_embeds": "prompt_embeds"}),
]


def preview_projection(info: FluxModelInfo) -> PreviewProjection:
    """Fit the latent -> RGB preview map to this model's VAE (once, at export)."""
    vae = load_component("vae_decoder", info)
    return fit_preview_projection(
        lambda latents: vae(latents)["image"], info.latent_channels, info.vae_scale_factor,
        info.vae_scaling_factor, info.vae_shift_factor,
    )


def render_configs(
    model_dir: str | Path,
    device: str = "cpu",
    precision: str = "FP32",
    limits: ServingLimits | None = None,
) -> dict[str, str]:
    """config.pbtxt text of every served model, by model name."""
    limits = limits or ServingLimits()
    info = load_model_info(model_dir)
    specs = component_specs(info, precision)
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    params = {"model_dir": str(info.model_dir), "precision": precision}
    if device == "gpu":
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    configs = {name: python_model_config(specs[name], params, kind) for name in COMPONENTS}
    configs["tokenizer"] = python_model_config(specs["tokenizer"], params, "KIND_CPU")
    configs["encode_prompt"] = ensemble_config(specs["encode_prompt"], ENCODE_STEPS)
    bls_params = dict(params, **{f.name: str(getattr(limits, f.name)) for f in fields(limits)})
    bls_params["preview_projection"] = json.dumps(preview_projection(info).to_json())
    configs["flux_bls"] = python_model_config(bls_spec(info), bls_params, kind, decoupled=True)
    return configs


def write_repository(model_dir: str | Path, dest: str | Path, **options) -> Path:
    """Render every config.pbtxt into `dest`, copying the model code there if `dest` is elsewhere."""
    dest = Path(dest).resolve()
    for name, text in render_configs(model_dir, **options).items():
        version_dir = dest / name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        source_code = SOURCE_REPOSITORY / name / "1" / "model.py"
        if dest != SOURCE_REPOSITORY and source_code.exists():
            shutil.copy2(source_code, version_dir / "model.py")
        (dest / name / "config.pbtxt").write_text(text)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/tiny-flux-schnell")
    parser.add_argument("--repository", default=str(SOURCE_REPOSITORY))
    parser.add_argument("--backend", default="torch", choices=["torch"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="FP32", choices=["FP32", "BF16", "FP16"])
    args = parser.parse_args(argv)
    dest = write_repository(args.model_dir, args.repository, device=args.device, precision=args.precision)
    print(f"model repository for {Path(args.model_dir).resolve()} ({args.backend}, {args.device}, "
          f"{args.precision}) written to {dest}")


if __name__ == "__main__":
    main()
