"""gRPC streaming client for `flux_bls`: live per-step previews, progress with step times, final PNG.

    python -m flux_triton.clients.stream_client --prompt "a red circle on a blue background" --out out/
    flux-client --prompt "a green square" --image photo.png --mask mask.png --strength 0.8
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from flux_triton.clients.image_files import ImageFileError, edit_inputs
from flux_triton.clients.previews import bls_options, linear_renderer, to_uint8_image, vae_inputs
from flux_triton.specs import IMAGE_ROLES, NUMBER_RANGES, PREVIEW_KINDS, bls_input

MODEL = "flux_bls"


@dataclass
class StreamResult:
    """Everything one generation streamed back."""

    steps: list[dict] = field(default_factory=list)  # step, timestep, preview_latent, seconds
    image: np.ndarray | None = None  # [B, H, W, 3] uint8
    seed: int | None = None
    timings: dict | None = None
    partial: bool = False
    steps_completed: int | None = None
    error: str | None = None
    error_status: str | None = None
    kinds: list[str] = field(default_factory=list)  # "step" / "image" / "final" in arrival order
    loras: dict | None = None  # the answer to `list_loras`
    queue_positions: list[int] = field(default_factory=list)  # while it waited in line
    responses: int = 0
    first_response_s: float | None = None  # the first step, image or error (not a place in line)
    total_s: float = 0.0


# numpy dtypes of the Triton types flux_bls declares (flux_triton.specs.BLS_INPUTS)
NUMPY_DTYPES = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64,
                "FP32": np.float32, "UINT8": np.uint8}


def checked_numbers(name: str, value, dtype: str) -> list:
    """`value` (one number or a list) as a list, each checked to fit `dtype` before any conversion
    to a fixed-width type; ValueError naming the field and quoting the value otherwise."""
    numbers = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if dtype == "BOOL":
        return numbers
    lo, hi = NUMBER_RANGES[dtype]
    for number in numbers:
        integral = isinstance(number, (int, np.integer)) and not isinstance(number, bool)
        if dtype != "FP32" and not integral:
            raise ValueError(f"`{name}`: must be an integer ({dtype}), got {number!r}")
        # NaN and infinity travel as they are (FP32 holds them; the server says what it accepts)
        if dtype == "FP32" and not math.isfinite(number):
            continue
        if not lo <= number <= hi:
            raise ValueError(f"`{name}`: must be in [{lo}, {hi}] ({dtype}), got {number!r}")
    return numbers


def input_arrays(**values) -> dict[str, np.ndarray]:
    """The numpy arrays of the given `flux_bls` fields; None values are left out (server defaults).

    Types and shapes come from the model's declared interface: strings (or lists of them) for
    BYTES [N], one number for [1] fields, a list of numbers for `sigmas`, uint8 arrays for images
    and masks (one image [H, W, 3] or a stack [N, H, W, 3]). A number that its type cannot hold
    is a ValueError naming the field, never a wrapped value.
    """
    arrays = {}
    for name, value in values.items():
        if value is None:
            continue
        spec = bls_input(name)
        if spec.dtype == "UINT8":
            array = np.asarray(value)
            if array.dtype != np.uint8:
                raise ValueError(f"`{name}`: must be a uint8 array, got {array.dtype}")
            if array.ndim == len(spec.dims) - 1:  # one image or mask
                array = array[None]
            if array.ndim != len(spec.dims):
                raise ValueError(f"`{name}`: must have {len(spec.dims)} dims {list(spec.dims)}, "
                                 f"got shape {list(array.shape)}")
        elif spec.dtype == "BYTES":
            strings = [value] if isinstance(value, str) else list(value)
            array = np.array([s.encode("utf-8") for s in strings], dtype=object)
        else:
            numbers = checked_numbers(name, value, spec.dtype)
            array = np.asarray(numbers, dtype=NUMPY_DTYPES[spec.dtype]).reshape(-1)
        arrays[name] = array
    return arrays


def build_inputs(**values) -> list[grpcclient.InferInput]:
    """InferInputs for the given `flux_bls` fields (`input_arrays`)."""
    inputs = []
    for name, array in input_arrays(**values).items():
        tensor = grpcclient.InferInput(name, list(array.shape), bls_input(name).dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def parse_lora(text: str) -> tuple[str, float]:
    """`NAME[:SCALE]` -> (name, scale); ValueError naming the form otherwise."""
    name, _, scale = text.partition(":")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise ValueError(f"`lora`: {text!r} is not NAME[:SCALE] (e.g. style:0.8)") from None


def queue_response(responses: queue.Queue, result, error) -> None:
    """Stream callback: put (result, error) on the queue the caller drains."""
    responses.put((result, error))


def stream_generate(
    client: grpcclient.InferenceServerClient,
    inputs: list[grpcclient.InferInput],
    on_step=None,
    timeout_s: float = 600.0,
    model: str = MODEL,
    stop_after_steps: int | None = None,
    on_queue=None,
) -> StreamResult:
    """Send one request on a gRPC stream and collect responses until the final flag.

    With `stop_after_steps`, the stream is cancelled once that many steps have arrived;
    `on_queue(place)` hears each place in line while the request waits (MAX_INFLIGHT).
    """
    responses: queue.Queue = queue.Queue()
    out = StreamResult()
    client.start_stream(callback=partial(queue_response, responses))
    try:
        began = last = time.perf_counter()
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout_s)
            now = time.perf_counter()
            names = set() if error is not None else {o.name for o in result.get_response().outputs}
            if "queue_position" in names:
                out.queue_positions.append(int(result.as_numpy("queue_position")[0]))
                out.responses += 1
                if on_queue:
                    on_queue(out.queue_positions[-1])
                last = now
                continue
            if out.first_response_s is None:
                out.first_response_s = now - began
            if error is not None:
                out.error = error.message() if hasattr(error, "message") else str(error)
                out.error_status = error.status() if hasattr(error, "status") else None
                out.kinds.append("error")
                break
            out.responses += 1
            final = result.get_response().parameters.get("triton_final_response")
            out.kinds += [kind for kind in ("step", "image") if kind in names]
            if "step" in names:
                step = {
                    "step": int(result.as_numpy("step")[0]),
                    "total_steps": int(result.as_numpy("total_steps")[0]),
                    "timestep": float(result.as_numpy("timestep")[0]),
                    "preview_latent": result.as_numpy("preview_latent"),  # None if not asked for
                    "preview_x0": result.as_numpy("preview_x0"),  # with preview_kind x0 or both
                    "seconds": now - last,
                }
                out.steps.append(step)
                if on_step:
                    on_step(step)
                if stop_after_steps is not None and len(out.steps) >= stop_after_steps:
                    out.kinds.append("cancelled")
                    break
            if "loras" in names:
                out.loras = json.loads(result.as_numpy("loras")[0])
            if "image" in names:
                out.image = result.as_numpy("image")
                out.seed = int(result.as_numpy("seed")[0])
                out.timings = json.loads(result.as_numpy("timings")[0])  # stage: [start, end] ms
                out.partial = bool(result.as_numpy("partial")[0])
                out.steps_completed = int(result.as_numpy("steps_completed")[0])
            last = now
            if final is not None and final.bool_param:
                out.kinds.append("final")
                break
        out.total_s = time.perf_counter() - began
    finally:
        # An unfinished stream (error, timeout, Ctrl-C) is cancelled so the server stops its loop;
        # a finished one is just closed.
        client.stop_stream(cancel_requests=not {"final", "error"} & set(out.kinds))
    return out




def preview_renderer(client: grpcclient.InferenceServerClient, decoder: str):
    """A function preview latent [B, C, h, w] -> uint8 [B, H, W, 3], or None when not available.

    `linear`: the cheap map fitted at export (one pixel per latent pixel, no server call).
    `vae`: the server's own `vae_decoder` model decodes each preview, at full size and in true
    colours (one more inference per step, in the type the repository serves the VAE in).
    """
    options = bls_options(client.get_model_config(MODEL, as_json=True)["config"])
    if decoder == "linear":
        return linear_renderer(options)

    def decode(latent: np.ndarray) -> np.ndarray:
        latents, dtype = vae_inputs(latent, options)
        tensor = grpcclient.InferInput("latents", list(latents.shape), dtype)
        tensor.set_data_from_numpy(latents)
        return to_uint8_image(client.infer("vae_decoder", [tensor]).as_numpy("image"))

    return decode


def terminal_thumbnail(rgb: np.ndarray, columns: int = 32) -> str:
    """An RGB image as ANSI true-colour half blocks (two pixel rows per text row)."""
    height, width, _ = rgb.shape
    step = max(1, width // columns)
    small = rgb[::step, ::step]
    lines = []
    for y in range(0, small.shape[0] - 1, 2):
        cells = [f"\x1b[38;2;{t[0]};{t[1]};{t[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m\u2580"
                 for t, b in zip(small[y], small[y + 1])]
        lines.append("".join(cells) + "\x1b[0m")
    return "\n".join(lines)


def preview_strip(previews: list[np.ndarray], image: np.ndarray) -> list[np.ndarray]:
    """Each step's preview scaled (nearest) to the image's size, then the image: the frames of
    the preview strip and GIF."""
    height, width = image.shape[:2]
    frames = [np.array(Image.fromarray(p).resize((width, height), Image.NEAREST)) for p in previews]
    return [*frames, image]


def save_preview_strip(frames: list[np.ndarray], out_dir: Path, index: int) -> list[Path]:
    """The frames side by side as one PNG, and as an animated GIF that rests on the image."""
    strip, gif = out_dir / f"preview_strip_{index}.png", out_dir / f"previews_{index}.gif"
    Image.fromarray(np.concatenate(frames, axis=1)).save(strip)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(gif, save_all=True, append_images=images[1:], loop=0,
                   duration=[250] * (len(images) - 1) + [1500])
    return [strip, gif]


def _progress(step: dict) -> str:
    done = int(30 * step["step"] / step["total_steps"])
    bar = "#" * done + "." * (30 - done)
    return (f"\r[{bar}] step {step['step']}/{step['total_steps']}  t={step['timestep']:7.2f}  "
            f"{step['seconds'] * 1000:8.1f} ms")


def _read(path: Path, field: str) -> bytes:
    """A file's bytes; ImageFileError naming the field when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageFileError(field, f"cannot read {path}: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream a FLUX generation from Triton's flux_bls.")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--prompt", action="append", help="repeat for a batch (required)")
    parser.add_argument("--prompt-2", action="append")
    parser.add_argument("--negative-prompt", action="append")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, help="num_inference_steps")
    parser.add_argument("--images-per-prompt", type=int)
    parser.add_argument("--max-sequence-length", type=int)
    parser.add_argument("--guidance", type=float, help="guidance_scale (dev models)")
    parser.add_argument("--true-cfg", type=float, help="true_cfg_scale (with --negative-prompt)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--deadline-ms", type=int, help="return the best image reached by then")
    parser.add_argument("--out", default="out", help="folder for previews and the final image")
    parser.add_argument("--no-previews", action="store_true",
                        help="do not ask for previews (--preview-kind none: no preview tensors are "
                             "sent or saved)")
    parser.add_argument("--preview-decoder", choices=["linear", "vae"], default="linear",
                        help="linear: the cheap latent->RGB map; vae: decode each preview with the "
                             "server's vae_decoder (full size, true colours, one call per step)")
    parser.add_argument("--preview-kind", choices=PREVIEW_KINDS, default="x0",
                        help="x0 (default): the image the model predicts from each step's latents, "
                             "recognisable from the first steps; latent: the latents reached")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                        help="a LoRA adapter of the server's LORA_DIR, with its scale (default 1.0); "
                             "repeat to combine adapters")
    parser.add_argument("--image", type=Path,
                        help="edit this image (PNG, JPEG, WebP, GIF, BMP): image-to-image, inpainting "
                             "with --mask, or Kontext editing with --image-role reference; the "
                             "output takes its size unless --height/--width say otherwise")
    parser.add_argument("--mask", type=Path,
                        help="the area to repaint, the image's size: white (255) = repaint, black = "
                             "keep; a PNG with transparency reads as OpenAI's masks (transparent = "
                             "repaint)")
    parser.add_argument("--strength", type=float,
                        help="how much of the image is repainted, (0, 1] (server default 0.6)")
    parser.add_argument("--image-role", choices=IMAGE_ROLES,
                        help="init (default): image-to-image or inpainting; reference: Kontext "
                             "editing (Kontext models only)")
    parser.add_argument("--cache-threshold", type=float,
                        help="the fast tier: skip a step's DiT blocks after the first while its "
                             "output barely moves (first-block cache; 0, the default, skips none)")
    parser.add_argument("--list-loras", action="store_true",
                        help="print the server's LoRA adapters and exit")
    parser.add_argument("--show", choices=["auto", "always", "never"], default="auto",
                        help="draw previews in the terminal (auto: when stdout is a terminal)")
    args = parser.parse_args(argv)
    if not args.prompt and not args.list_loras:
        parser.error("--prompt is required (or --list-loras)")
    if args.image is None and (args.mask or args.strength is not None or args.image_role):
        parser.error("--mask, --strength and --image-role edit an image: give --image too")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    show = args.show == "always" or (args.show == "auto" and sys.stdout.isatty())
    try:
        image = mask = None
        if args.image is not None:
            image, mask = edit_inputs([_read(args.image, "image")],
                                      _read(args.mask, "mask") if args.mask else None)
        loras = [parse_lora(text) for text in args.lora]
        inputs = build_inputs(list_loras=True) if args.list_loras else build_inputs(
            prompt=args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative_prompt,
            height=args.height, width=args.width, num_inference_steps=args.steps,
            num_images_per_prompt=args.images_per_prompt,
            max_sequence_length=args.max_sequence_length, guidance_scale=args.guidance,
            true_cfg_scale=args.true_cfg, seed=args.seed, deadline_ms=args.deadline_ms,
            preview_kind="none" if args.no_previews else args.preview_kind,
            lora=[name for name, _ in loras] or None, lora_scale=[scale for _, scale in loras] or None,
            image=image, mask=mask, strength=args.strength, image_role=args.image_role,
            cache_threshold=args.cache_threshold,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        client = grpcclient.InferenceServerClient(args.url)
        if not client.is_model_ready(MODEL):
            print(f"error: model {MODEL} is not ready on {args.url}", file=sys.stderr)
            return 2
        render = preview_renderer(client, args.preview_decoder)
    except InferenceServerException as exc:
        print(f"error: cannot reach Triton at {args.url}: {exc.message()}", file=sys.stderr)
        return 2

    if args.list_loras:
        result = stream_generate(client, inputs)
        if result.error:
            print(f"error: {result.error}", file=sys.stderr)
            return 1
        print(json.dumps(result.loras, indent=1))
        return 0
    previews: dict[int, list[np.ndarray]] = {}

    def on_step(step: dict) -> None:
        print(_progress(step), end="", flush=True)
        latent = step["preview_x0"] if step["preview_x0"] is not None else step["preview_latent"]
        if render is None or latent is None:
            return
        rgb = render(latent)
        for b, image in enumerate(rgb):
            Image.fromarray(image).save(out_dir / f"preview_step{step['step']:02d}_{b}.png")
            previews.setdefault(b, []).append(image)
        if show:
            print("\n" + terminal_thumbnail(rgb[0]), flush=True)

    def on_queue(place: int) -> None:
        print(f"\rwaiting in line: place {place}   ", end="", flush=True)

    result = stream_generate(client, inputs, on_step=on_step, on_queue=on_queue)
    print()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    paths = []
    for b, image in enumerate(result.image):
        path = out_dir / f"image_{b}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
        if previews.get(b):
            paths += map(str, save_preview_strip(preview_strip(previews[b], image), out_dir, b))
    print(f"{len(result.steps)} steps streamed in {result.responses} responses, "
          f"first after {result.first_response_s * 1000:.0f} ms, total {result.total_s:.2f} s, "
          f"seed {result.seed}")
    if result.partial:
        print(f"PARTIAL: the deadline stopped the loop after {result.steps_completed} steps")
    cache = result.timings.get("first_block_cache")
    if cache:
        print(f"first-block cache at {cache['threshold']:.3g}: {cache['dit_calls_skipped']} of "
              f"{cache['dit_calls']} DiT calls ran only the first block")
    print("server timings (ms): " + ", ".join(
        f"{k}={v[1] - v[0]:.1f}" for k, v in result.timings.items() if isinstance(v, list)))
    print("saved " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
