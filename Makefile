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
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PROMPT ?= a red circle on a blue background
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup model train-default accuracy export engines serve demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,export]'
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0 open-clip-torch==3.3.0
	touch $@

setup: $(VENV)/.installed

models/.built: $(VENV)/.installed flux_triton/tiny_model.py
	$(PY) -m flux_triton.tiny_model --out models --variant all
	touch $@

model: models/.built

# The embedded default (committed): a small FLUX trained on the shapes world. Minutes on a GPU; on a
# CPU only as a smoke run: make train-default TRAIN_OUT=out/shapes-smoke \
#   TRAIN_ARGS="--size 32 --vae-steps 3 --dit-steps 3 --images-per-caption 1"
train-default: setup
	$(PY) -m flux_triton.train_default --out $(TRAIN_OUT) --max-minutes $(TRAIN_MINUTES) $(TRAIN_ARGS)

# Renders every caption of the shapes world and classifies the pixels (classifier checked first).
accuracy: setup
	$(PY) -m flux_triton.shapes_accuracy --model-dir $(MODEL_DIR) --seeds 4 --out out/shapes_accuracy.json

export: setup
	$(PY) -m export.repository --model-dir $(MODEL_DIR) --backend $(BACKEND) --device $(DEVICE) \
		--precision $(PRECISION)

# TensorRT plans (needs the tensorrt package and a GPU; says what is missing otherwise).
engines: setup
	$(PY) -m export.repository --model-dir $(MODEL_DIR) --backend tensorrt

serve: setup
	$(PY) -m flux_triton.tritonserver --repository model_repository --http-port $(HTTP_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo: setup
	$(MAKE) export
	$(PY) -m clients.demo --repository model_repository --grpc-port $(GRPC_PORT) \
		--http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) --prompt "$(PROMPT)" --out out

test: model
	$(PY) -m pytest -q tests

# In-process vs served through Triton, tiny model on the CPU; prints a table, writes out/bench.json.
bench: model
	$(PY) -m clients.bench --model-dir models/tiny-flux-schnell --out out/bench.json

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf out .triton models/.built
