"""Tensor and config helpers shared by the adapters (the `pb` module is passed in, never imported)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.utils.dlpack

from flux_triton.errors import STATUS_CODES, tag_status
from flux_triton.loras import LoraCatalog, read_catalog
from flux_triton.serving_config import LORA_DIR_ENV, MODEL_DIR_ENV, Options, read_options


def model_options(args: dict, cls: type[Options]) -> Options:
    """The model's options (`flux_triton.serving_config`), from the config Triton passes."""
    return read_options(cls, json.loads(args["model_config"]))


def resolve_model_dir(args: dict, model_dir: str) -> Path:
    """The diffusers model folder to serve.

    `$FLUX_TRITON_MODEL_DIR` when set; else the options' `model_dir`, which export writes relative
    to the model repository's root, so a repository moved together with its model keeps working.
    """
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).resolve()
    path = Path(model_dir)
    if not path.is_absolute():
        # args["model_repository"] is this model's own folder, <repository>/<model name>
        path = Path(args["model_repository"]).parent / path
    return path.resolve()


def lora_catalog(args: dict, lora_dir: str | None) -> LoraCatalog:
    """The LoRA adapters this model serves: none without a `lora_dir` option (the export decided
    the backend cannot apply them); else those of $FLUX_TRITON_LORA_DIR, or of `lora_dir`
    (relative to the repository, like model_dir)."""
    if lora_dir is None:
        return LoraCatalog(None)
    override = os.environ.get(LORA_DIR_ENV)
    path = Path(override) if override else Path(lora_dir)
    if not path.is_absolute():
        path = Path(args["model_repository"]).parent / path
    return read_catalog(path.resolve())


def log(pb: Any, message: str, error: bool = False) -> None:
    """A line in Triton's log through the stub's Logger (stand-ins may have none)."""
    logger = getattr(pb, "Logger", None)
    if logger is not None:
        (logger.log_error if error else logger.log_info)(message)


def instance_device(args: dict) -> str:
    """`cuda:N` for a KIND_GPU instance (made the calling thread's current GPU), else `cpu`."""
    if args.get("model_instance_kind") == "GPU":
        index = int(args["model_instance_device_id"])
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            # On the thread that initializes and executes (the stub's main thread), streams, CUDA
            # graphs and kernels launched without an explicit device go to the instance's own GPU.
            torch.cuda.set_device(index)
        return f"cuda:{index}"
    return "cpu"


def to_torch(tensor: Any) -> torch.Tensor:
    """A Triton tensor as a torch tensor on the same device, without a copy."""
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def aligned(value: torch.Tensor) -> torch.Tensor:
    """A CPU tensor in freshly allocated memory.

    Tensors in Triton's shared memory can start at any offset, and CPU matmul kernels round
    differently on unaligned data (~1e-7): a copy keeps results bit-identical to diffusers.
    """
    return value.clone() if value.device.type == "cpu" else value


def from_torch(pb: Any, name: str, value: torch.Tensor) -> Any:
    """A torch tensor as a named Triton tensor, without a copy."""
    return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def error_response(pb: Any, message: str, code_name: str = "INTERNAL", tag: str | None = None
                   ) -> Any:
    """An InferenceResponse carrying a TritonError with the given status code, also tagged into
    its text (`flux_triton.errors`): the only part of it a BLS caller sees on Triton 2.51. `tag`
    spells a code the backend cannot set instead (RESOURCE_EXHAUSTED, sent on UNAVAILABLE)."""
    return pb.InferenceResponse(error=pb.TritonError(tag_status(tag or code_name, message),
                                                     getattr(pb.TritonError, code_name)))


def status_code_name(pb: Any, error: Any) -> str | None:
    """The name of a TritonError's status code (`UNAVAILABLE`, ...), or None when it has none."""
    code = error.code() if hasattr(error, "code") else None
    if code is None:
        return None
    for name in STATUS_CODES:
        if getattr(pb.TritonError, name, object()) == code:
            return name
    return None
