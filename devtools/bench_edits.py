"""`make bench-edits`: image inputs on one GPU at full size, served: the VAE encode, image-to-image,
inpainting and a Kontext edit against text-to-image, compiled with CUDA graphs, BF16 and FP8.

FLUX.1-dev's architecture with random bf16 weights (`devtools.full_size`), saved as a Kontext
folder so one server takes both roles; 1024², dev's 28 steps, text length 512. Image-to-image at
strength 0.6 runs the last 17 of them; a Kontext step carries the reference image's 4096 tokens
beside the output's. The repository is exported as `make export` does, with the warm-up list of
a Kontext model (the default shape, and the same editing a reference image). Last, a shape not in
that list (768x1360) twice: what an unwarmed shape costs on its first request and after. Results
merge into `--out` by precision, with the card, driver and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from devtools.bench_gpu import environment, print_server_problems
from devtools.full_size import write_full_size_folder
from flux_triton.serving_config import ServingLimits
from flux_triton.specs import ServingShape

SIZE, TEXT_LENGTH, STEPS = 1024, 512, 28
UNWARMED = (768, 1360)
PROMPT = "a photograph of a lighthouse on a cliff at sunset, detailed, 35mm"


def test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def cases() -> dict[str, dict]:
    """The requests timed, by name (fields of `build_inputs`)."""
    base = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=0,
                max_sequence_length=TEXT_LENGTH, guidance_scale=3.5)
    image = test_image(SIZE, SIZE)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[256:768, 256:768] = 255
    return {
        "text-to-image": base,
        "image-to-image (strength 0.6)": dict(base, image=image, strength=0.6),
        "inpainting (strength 0.6)": dict(base, image=image, mask=mask, strength=0.6),
        "kontext (reference 1024²)": dict(base, image=image, image_role="reference"),
    }


def summary(streams: list) -> dict:
    """Medians over runs: end to end, first preview, step interval, the BLS's DiT call and the
    VAE spans the server reports."""
    first = streams[0]
    steps = len(first.steps)
    dit_ms = [r.timings[f"step_{i}"][1] - r.timings[f"step_{i}"][0]
              for r in streams for i in range(2, steps + 1)]

    def span(name):
        values = [r.timings[name][1] - r.timings[name][0] for r in streams if name in r.timings]
        return round(statistics.median(values), 2) if values else None

    return {"steps": steps, "e2e_s": round(statistics.median(r.total_s for r in streams), 3),
            "e2e_runs_s": [round(r.total_s, 3) for r in streams],
            "first_preview_s": round(statistics.median(r.first_response_s for r in streams), 3),
            "step_interval_ms": round(statistics.median(
                s["seconds"] for r in streams for s in r.steps[1:]) * 1000, 2),
            "bls_dit_call_ms": round(statistics.median(dit_ms), 2) if dit_ms else None,
            "vae_encoder_ms": span("vae_encoder"), "vae_decoder_ms": span("vae_decoder")}


def run_precision(folder: Path, precision: str, workdir: Path, runs: int) -> dict:
    import tritonclient.grpc as grpcclient

    from devtools.processes import free_port
    from flux_triton.clients.stream_client import build_inputs, stream_generate
    from flux_triton.export.repository import write_repository
    from flux_triton.server.launcher import TritonServer

    repository = workdir / f"repository-{precision}"
    shape = ServingShape(1, SIZE, SIZE, TEXT_LENGTH)
    warmup = (shape, ServingShape(1, SIZE, SIZE, TEXT_LENGTH, reference=True))
    began = time.perf_counter()
    write_repository(folder, repository, device="gpu", precision=precision, warmup=warmup,
                     precompile=True, cuda_graphs=True, limits=ServingLimits(max_batch=1),
                     random_weights=True)
    result = {"warmup": [str(s) for s in warmup], "export_s": round(time.perf_counter() - began, 1),
              "cases": {}}
    ports = [free_port() for _ in range(3)]
    log = repository / f"tritonserver-{precision}.log"
    server = TritonServer(repository, *ports, log_file=log)
    try:
        result["ready_s"] = round(server.start(timeout_s=1500), 1)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")

        def stream(fields):
            out = stream_generate(client, build_inputs(**fields), timeout_s=900)
            if out.error:
                raise RuntimeError(out.error)
            return out

        for name, fields in cases().items():
            stream(fields)  # the first of each kind: previews' host buffers, allocator
            result["cases"][name] = summary([stream(fields) for _ in range(runs)])
            print(json.dumps({precision: {name: result["cases"][name]}}), flush=True)
        height, width = UNWARMED
        unwarmed = dict(cases()["image-to-image (strength 0.6)"], image=test_image(height, width),
                        height=height, width=width)
        first = stream(unwarmed)
        later = [stream(unwarmed) for _ in range(runs)]
        result["unwarmed_shape"] = {"size": f"{height}x{width}", "first": summary([first]),
                                    "later": summary(later)}
        print(json.dumps({precision: {"unwarmed": result["unwarmed_shape"]}}), flush=True)
        client.close()
    finally:
        server.stop()
        print_server_problems(log)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="BF16,FP8")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokenizers-from", default="models/shapes-flux")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edits-gpu.json"))
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-edits-"))
    folder = write_full_size_folder(workdir / "flux-dev-kontext", "dev", args.tokenizers_from)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="FluxKontextPipeline")))
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    data.setdefault("what", __doc__.splitlines()[0])
    for precision in args.precisions.split(","):
        row = run_precision(folder, precision, workdir, args.runs)
        data.setdefault("precisions", {})[precision] = dict(row, environment=environment())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
    for precision, row in data.get("precisions", {}).items():
        for name, case in row["cases"].items():
            print(f"{precision:5} {name:32} steps {case['steps']:3}  e2e {case['e2e_s']:7.3f} s  "
                  f"DiT {case['bls_dit_call_ms']} ms  encode {case['vae_encoder_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
