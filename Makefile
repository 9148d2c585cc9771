# FLUX on Triton: setup -> model -> export -> serve; demo and test do the whole chain.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/shapes-flux
TRAIN_MINUTES ?= 20
TRAIN_OUT ?= models/shapes-flux
BACKEND ?= torch
DEVICE ?= cpu
PRECISION ?= FP32
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
REPOSITORY ?= model_repository
PROMPT ?= a red circle on a blue background
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Given on the command line (or in the environment), these reach `make serve` too.
given = $(filter command line environment,$(origin $(1)))
SERVE_OPTIONS = $(if $(call given,DEVICE),--device $(DEVICE)) \
	$(if $(call given,MODEL_DIR),--model-dir $(MODEL_DIR)) $(if $(call given,MPS),--mps $(MPS)) \
	$(if $(call given,SUPERVISOR_PORT),--supervisor-port $(SUPERVISOR_PORT)) \
	$(if $(call given,LORA_DIR),--lora-dir $(LORA_DIR)) \
	$(if $(call given,MAX_INFLIGHT),--max-inflight $(MAX_INFLIGHT)) \
	$(if $(call given,MAX_QUEUE),--max-queue "$(MAX_QUEUE)")
# GPU export options (torch backend): COMPILE=0|1, CUDA_GRAPHS=0|1, WARMUP=BxHxWxS[,...],
# PRECOMPILE=0|1 (default 1: the export compiles every network into the server's compile cache);
# BATCH_DELAY_US=N shares DiT calls between concurrent streams (0, the default: off);
# ONNX_PRECISION=FP32|BF16|FP8: the graphs BACKEND=tensorrt builds from;
# GPUS=all|0,1,...: a copy of each network and a flux_bls instance on each listed GPU (DEVICE=gpu);
# SEQUENCE_PARALLEL=N: one DiT over N GPUs (its sequence split between them), with GPUS in groups of N;
# MAX_PIXEL_STEPS=N: the most work one request may ask for, height × width × steps × images;
# RANDOM_WEIGHTS=1: serve a folder of configs without weights (random_weights.json), for benchmarks;
# LORA_DIR=...: the LoRA adapters requests may name (default <model folder>/loras); MAX_LORAS=N
# MAX_INFLIGHT=M: generations running at once per GPU (default 4), the rest wait in line;
# MAX_QUEUE=N: requests that may wait on the whole server, past it refused at once (default: no bound)
# FP8_SCALES=static (PRECISION=FP8): static input scales for the DiT's float8 layers, calibrated at
# export on CALIBRATION_PROMPTS (a file, one prompt per line; default: a built-in set);
# FUSE_QKV=1: the DiT computes each attention's query, key and value in one Linear layer
EXPORT_OPTIONS = $(if $(call given,COMPILE),--compile $(COMPILE)) \
	$(if $(call given,CUDA_GRAPHS),--cuda-graphs $(CUDA_GRAPHS)) $(if $(call given,WARMUP),--warmup $(WARMUP)) \
	$(if $(call given,PRECOMPILE),--precompile $(PRECOMPILE)) \
	$(if $(call given,BATCH_DELAY_US),--batch-delay-us $(BATCH_DELAY_US)) \
	$(if $(call given,ONNX_PRECISION),--onnx-precision $(ONNX_PRECISION)) \
	$(if $(call given,GPUS),--gpus $(GPUS)) \
	$(if $(call given,SEQUENCE_PARALLEL),--sequence-parallel $(SEQUENCE_PARALLEL)) \
	$(if $(call given,MAX_PIXEL_STEPS),--max-pixel-steps $(MAX_PIXEL_STEPS)) \
	$(if $(call given,RANDOM_WEIGHTS),--random-weights $(RANDOM_WEIGHTS)) \
	$(if $(call given,LORA_DIR),--lora-dir $(LORA_DIR)) $(if $(call given,MAX_LORAS),--max-loras $(MAX_LORAS)) \
	$(if $(call given,MAX_INFLIGHT),--max-inflight $(MAX_INFLIGHT)) \
	$(if $(call given,MAX_QUEUE),--max-queue "$(MAX_QUEUE)") \
	$(if $(call given,FP8_SCALES),--fp8-scales $(FP8_SCALES)) \
	$(if $(call given,CALIBRATION_PROMPTS),--calibration-prompts $(CALIBRATION_PROMPTS)) \
	$(if $(call given,FUSE_QKV),--fuse-qkv $(FUSE_QKV))

.PHONY: setup setup-browser gateway model train-default train-lora accuracy export engines serve demo test test-fast bench bench-gpu bench-scale bench-lora bench-edits bench-fast-tier bench-load soak edits-accuracy fast-tier-accuracy export-full-size gpu-bundle lint clean

$(VENV)/.installed: pyproject.toml requirements/cpu-constraints.txt requirements/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/cpu-constraints.txt -e '.[serve,client,gateway,export,dev]'
	$(PY) -m pip install -q --no-deps -r requirements/no-deps.txt
	touch $@

setup: $(VENV)/.installed

# Debian's chromium for the browser tests (Playwright drives it; it downloads no browser of its own).
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)
setup-browser: setup
	@if [ -z "$(CHROMIUM)" ]; then apt-get update -q && apt-get install -y -q chromium; fi
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null

models/.built: $(VENV)/.installed devtools/tiny_models.py devtools/tokenizers.py
	$(PY) -m devtools.tiny_models --out models --variant all
	touch $@

model: models/.built

# The embedded default (committed): a small FLUX trained on the shapes world. Minutes on a GPU; on a
# CPU only as a smoke run: make train-default TRAIN_OUT=out/shapes-smoke \
#   TRAIN_ARGS="--size 32 --vae-steps 3 --dit-steps 3 --images-per-caption 1"
train-default: setup
	$(PY) -m devtools.train_shapes --out $(TRAIN_OUT) --max-minutes $(TRAIN_MINUTES) $(TRAIN_ARGS)

# The default model's `outline` LoRA adapter (models/shapes-flux/loras/outline, committed): minutes on
# a GPU. LORA_ARGS, e.g. "--max-minutes 2 --rank 8".
train-lora: setup
	$(PY) -m devtools.train_lora --model-dir $(MODEL_DIR) $(LORA_ARGS)

# Renders every caption of the shapes world and classifies the pixels (classifier checked first), and
# again with each adapter of the model whose property it knows (outline: on >= 90 % of images).
# On a GPU: make accuracy DEVICE=gpu PRECISIONS=FP32,BF16,FP8 (PSNR of each against the first, too);
# FP8-static (FP8_SCALES=static, calibrated on CALIBRATION_PROMPTS: a file, or `captions`) and a +qkv
# suffix (FUSE_QKV=1) run on the CPU as well.
PRECISIONS ?= $(PRECISION)
accuracy: setup
	$(PY) -m devtools.shapes_accuracy --model-dir $(MODEL_DIR) --seeds 4 --device $(DEVICE) \
		--precisions $(PRECISIONS) --out out/shapes_accuracy.json \
		$(if $(call given,CALIBRATION_PROMPTS),--calibration-prompts $(CALIBRATION_PROMPTS))

# Image edits on the shapes model: image-to-image to a new shape at strength 0.8 and inpainting a new
# background, every caption x 4 seeds, scored by the classifier (docs/edits.md).
edits-accuracy: setup
	$(PY) -m devtools.shapes_edits --model-dir $(MODEL_DIR) --seeds 4 --device $(DEVICE) \
		--out out/shapes_edits.json

# The fast tier on the shapes model: every caption x 4 seeds, one request each, at each first-block
# cache threshold: classifier accuracy, PSNR against no caching, DiT calls skipped (at 12 steps, and
# the skip share at 28 for the full-size estimate; docs/fast-tier.md).
FAST_TIER_THRESHOLDS ?= 0,0.05,0.1,0.15,0.2,0.25,0.3,0.4
fast-tier-accuracy: setup
	$(PY) -m devtools.shapes_fast_tier --model-dir $(MODEL_DIR) --seeds 4 --device $(DEVICE) \
		--thresholds $(FAST_TIER_THRESHOLDS) --steps-for-speed 28 --out out/shapes_fast_tier.json

# Never deletes another backend's ONNX graphs or TensorRT plans: it lists the ones it leaves unused.
# DEVICE=gpu PRECISION=BF16|FP8 compiles at load by default (COMPILE=0 turns it off).
export: setup
	$(PY) -m flux_triton.export.repository --model-dir $(MODEL_DIR) --backend $(BACKEND) --device $(DEVICE) \
		--precision $(PRECISION) $(EXPORT_OPTIONS)

# TensorRT plans (needs the tensorrt package and a GPU; says what is missing otherwise), from FP32,
# BF16 or FP8 graphs (ONNX_PRECISION=FP32|BF16|FP8; BF16 and FP8 are built strongly typed).
engines: setup
	$(PY) -m flux_triton.export.repository --model-dir $(MODEL_DIR) --backend tensorrt $(EXPORT_OPTIONS)

# HOST=0.0.0.0 listens on every interface; DEVICE=gpu (or a GPU repository) turns GPU metrics on;
# MODEL_DIR=... serves that folder with the rendered repository (e.g. a moved or mounted one).
serve: setup
	$(PY) -m flux_triton.server.launcher --repository $(REPOSITORY) --host $(HOST) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(SERVE_OPTIONS)

# LORA=NAME[:SCALE] streams the demo with that adapter of LORA_DIR (e.g. LORA=outline).
demo: setup
	$(MAKE) export
	$(PY) -m devtools.demo --repository model_repository --grpc-port $(GRPC_PORT) \
		--http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) --prompt "$(PROMPT)" --out out \
		$(if $(LORA),--lora $(LORA))

test: model setup-browser
	$(PY) -m pytest -q tests

# The HTTP gateway in front of the server: OpenAI-style /v1/images/generations (SSE previews with
# "stream": true) and the web page at /. GATEWAY_API_KEY, GATEWAY_CORS_ORIGINS: optional.
GATEWAY_HOST ?= 127.0.0.1
GATEWAY_PORT ?= 8080
GATEWAY_TRITON_URL ?= 127.0.0.1:$(GRPC_PORT)
gateway: setup
	GATEWAY_HOST=$(GATEWAY_HOST) GATEWAY_PORT=$(GATEWAY_PORT) GATEWAY_TRITON_URL=$(GATEWAY_TRITON_URL) \
		$(PY) -m flux_triton.gateway

# Unit tests plus one served smoke test: minutes, for a change to one module.
test-fast: model
	$(PY) -m pytest -q -m fast tests

# In-process vs served through Triton, tiny model on the CPU; prints a table, writes out/bench.json.
bench: model
	$(PY) -m devtools.bench_cpu --model-dir models/tiny-flux-schnell --out out/bench.json

# The GPU table (make bench-gpu on a GPU machine with torch; docs/performance.md says how): (a)
# diffusers eager, (b) in-process, (c) served, merged into BENCH_OUT. BENCH_ARGS picks cases, e.g.
# BENCH_ARGS="--variants schnell --precisions FP8 --batches 1"; the levers are precision labels:
# FP8-static (FP8_SCALES=static), +qkv (FUSE_QKV=1), e.g. --precisions FP8,FP8-static+qkv.
GPU_PYTHON ?= python3
BENCH_OUT ?= benchmarks/results/bench-gpu.json
bench-gpu:
	$(GPU_PYTHON) -m devtools.bench_gpu --out $(BENCH_OUT) $(BENCH_ARGS)

# Scale-out table on a multi-GPU machine: one GPU vs several (GPUS), DiT batching off vs on, at
# 1024² and 512², concurrency 1-8, merged into SCALE_OUT. SCALE_ARGS picks cases, e.g.
# SCALE_ARGS="--gpus 0 0,1 --batch-delays-us 0 --sizes 512".
SCALE_OUT ?= benchmarks/results/scale-gpu.json
bench-scale:
	$(GPU_PYTHON) -m devtools.bench_scale --out $(SCALE_OUT) $(SCALE_ARGS)

# LoRA adapters at full size on one GPU (random weights, 1024², rank 64 on every attention and MLP
# Linear): step time with and without, switch time, compile/capture counters; merged into LORA_OUT.
LORA_OUT ?= benchmarks/results/lora-gpu.json
bench-lora:
	$(GPU_PYTHON) -m devtools.bench_lora --out $(LORA_OUT) $(LORA_BENCH_ARGS)

# Image inputs at full size on one GPU (random weights, 1024², dev 28 steps, text 512), served
# compiled with CUDA graphs: VAE encode, image-to-image, inpainting, a Kontext step, an unwarmed
# shape; merged into EDITS_OUT by precision (EDITS_ARGS="--precisions FP8").
EDITS_OUT ?= benchmarks/results/edits-gpu.json
bench-edits:
	$(GPU_PYTHON) -m devtools.bench_edits --out $(EDITS_OUT) $(EDITS_ARGS)

# The fast tier's cached DiT calls at full size on one GPU (computed, skipped, against the lossless
# graph), applied to the shapes model's skip shares: FAST_TIER_OUT.
FAST_TIER_OUT ?= benchmarks/results/fast-tier-gpu.json
# Load on one GPU, the shapes model compiled with CUDA graphs: concurrency 1-128, previews off and
# on, MAX_INFLIGHT unbounded / 4 / 8 and MAX_QUEUE 32 (devtools/bench_load.py).
LOAD_OUT ?= benchmarks/results/load-gpu.json
bench-load:
	$(GPU_PYTHON) -m devtools.bench_load --out $(LOAD_OUT) $(LOAD_ARGS)

# A supervised CPU server under mixed load with faults and a component killed every 5 minutes
# (devtools/soak.py): every request ends with its image or a clear error, memory stays flat.
SOAK_MINUTES ?= 30
soak: setup
	$(PY) -m devtools.soak --minutes $(SOAK_MINUTES) --out benchmarks/results/soak-cpu.json

bench-fast-tier:
	$(GPU_PYTHON) -m devtools.bench_fast_tier --out $(FAST_TIER_OUT) $(FAST_TIER_ARGS)

# FLUX.1 exported to ONNX at full size (random bf16 weights) on a GPU machine and measured: time,
# peak host/GPU memory, sizes, checker, parity at 256² (docs/export.md, "Full-size ONNX export"). Entries
# merge into FULL_SIZE_REPORT; FULL_SIZE_ARGS picks a group per run, e.g.
# FULL_SIZE_ARGS="--variant dev --components dit_transformer --precisions FP8".
FULL_SIZE_REPORT ?= benchmarks/results/export-full-size.json
FULL_SIZE_DIR ?= out/export-full-size
export-full-size:
	$(GPU_PYTHON) -m devtools.export_full_size --out-dir $(FULL_SIZE_DIR) --report $(FULL_SIZE_REPORT) \
		$(FULL_SIZE_ARGS)

# .whl/gpu_bundle.tar.xz + .whl/install.sh: what a GPU machine with only torch needs, from PyPI.
gpu-bundle:
	bash benchmarks/gpu_bundle.sh .whl

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf out .triton models/.built
