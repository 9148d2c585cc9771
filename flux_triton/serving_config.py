"""The serving configuration, declared once: typed options per served model and the repository's
layout. `make export` is its one writer; the adapters, the launcher, the supervisor and the
clients read it through this module alone. Adding an option is adding a field.

- Each Python model's options travel in its config.pbtxt as one parameter, `OPTIONS_PARAMETER`
  (JSON), which Triton hands the model at `initialize` and clients read with `get_model_config`.
- How Triton runs each model (backend, device kind, GPUs, instances, decoupled) is also written
  to `REPOSITORY_FILE` beside the model folders, for the launcher and the supervisor; config.pbtxt
  is rendered from the same objects.

stdlib only: the clients, the launcher and the supervisor import it without torch.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flux_triton.specs import PRECISIONS

# Set at serve time (e.g. `make serve MODEL_DIR=...`, or a container's mount point), this overrides
# the `model_dir` of every model, so one rendered repository serves a folder mounted anywhere.
MODEL_DIR_ENV = "FLUX_TRITON_MODEL_DIR"
# Overrides `compile_cache_dir`, e.g. for a read-only repository volume.
COMPILE_CACHE_ENV = "FLUX_TRITON_COMPILE_CACHE"
# Overrides `lora_dir`: where the LoRA adapters are (`make serve LORA_DIR=...`).
LORA_DIR_ENV = "FLUX_TRITON_LORA_DIR"
# Override `max_inflight` and `max_queue` (`make serve MAX_INFLIGHT=... MAX_QUEUE=...`; an empty
# MAX_QUEUE or `none`: no bound).
MAX_INFLIGHT_ENV = "FLUX_TRITON_MAX_INFLIGHT"
MAX_QUEUE_ENV = "FLUX_TRITON_MAX_QUEUE"
# Generations one flux_bls instance (one GPU) runs at once unless MAX_INFLIGHT says otherwise
# (docs/performance.md, "Holding load": measured on the CPU, not yet on a GPU).
DEFAULT_MAX_INFLIGHT = 4
OPTIONS_PARAMETER = "flux_options"
REPOSITORY_FILE = "flux_repository.json"

PLATFORMS = ("python", "tensorrt_plan", "ensemble")
KINDS = ("KIND_CPU", "KIND_GPU")
BACKENDS = ("torch", "onnx", "tensorrt")  # what runs the four networks
PYTHON_BACKENDS = ("torch", "onnx")  # of those, what a Python model runs
# FP8_SCALES: how the DiT's float8 layers scale their inputs (torchao's per-row maxima at every
# call, or static scales calibrated at export into FP8_CALIBRATION_FILE, in the repository)
FP8_SCALES = ("dynamic", "static")
FP8_CALIBRATION_FILE = "fp8_calibration.json"


class ConfigError(ValueError):
    """A configuration that does not match the schema; the message names the field."""


def _check_choice(model: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{model}.{name}: must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class ServingLimits:
    """Upper bounds a deployment accepts for one request."""

    max_height: int = 2048
    max_width: int = 2048
    max_batch: int = 16
    max_inference_steps: int = 100
    max_prompt_chars: int = 4096
    # The work one request may ask for: height × width × steps × images (4 images of 1024² at 50
    # steps), so that no request holds a GPU for many minutes whatever the single limits allow.
    max_pixel_steps: int = 1024 * 1024 * 50 * 4
    max_loras: int = 4  # LoRA adapters one request may combine
    max_reference_images: int = 10  # FLUX.2: reference images one request may give (multi-reference)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed component call is tried again, and how long to wait before each retry."""

    attempts: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def delay(self, retry: int) -> float:
        return min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)


@dataclass(frozen=True)
class NetworkOptions:
    """A served network (`clip_encoder`, `t5_encoder`, `dit_transformer`, `vae_decoder`, or a
    per-GPU copy of one) or the tokenizer, as a Python model."""

    network: str  # what it computes; a copy `<network>_gpu<k>` names its network here
    model_dir: str  # the diffusers folder, relative to the repository ($FLUX_TRITON_MODEL_DIR wins)
    precision: str = "FP32"  # specs.PRECISIONS
    backend: str = "torch"  # torch | onnx (TensorRT plans are not Python models)
    compile: bool = False  # torch.compile at load (GPU)
    cuda_graphs: bool = False  # replay as CUDA graphs per warmed-up shape (GPU)
    warmup: tuple[str, ...] = ()  # ServingShape texts, BxHxWxS, prepared at load
    compile_cache_dir: str | None = None  # relative to the repository
    # LoRA adapters (clip_encoder, dit_transformer): relative to the repository; None is
    # `<model folder>/loras` ($FLUX_TRITON_LORA_DIR wins)
    lora_dir: str | None = None
    # The folder holds configs and no weights (random_weights.json): build random ones. Only ever
    # set by an explicit RANDOM_WEIGHTS=1 at export (benchmarks of the full-size architecture).
    random_weights: bool = False
    # SEQUENCE_PARALLEL (the DiT): the devices of its group, rank 0 first (the instance's own);
    # empty: one device
    sequence_parallel_devices: tuple[str, ...] = ()
    # FP8_SCALES=static (the DiT in FP8): its calibration file, relative to the repository
    fp8_calibration: str | None = None
    fuse_qkv: bool = False  # FUSE_QKV=1 (the DiT): query, key and value in one Linear layer

    def __post_init__(self) -> None:
        _check_choice(self.network, "backend", self.backend, PYTHON_BACKENDS)
        _check_choice(self.network, "precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class BlsOptions:
    """`flux_bls`: the pipeline's own options, and what a client needs to decode previews."""

    model_dir: str
    precision: str = "FP32"
    backend: str = "torch"
    lora_dir: str | None = None  # as NetworkOptions.lora_dir: the adapters a request may name
    limits: ServingLimits = ServingLimits()
    retry: RetryPolicy = RetryPolicy()
    batch_delay_us: int = 0  # 0: every request its own DiT calls (batched kernels round otherwise)
    max_inflight: int = DEFAULT_MAX_INFLIGHT  # generations running at once per instance (GPU)
    max_queue: int | None = None  # requests waiting on the whole server; None: no bound
    # network -> the Triton type of its floating-point inputs (FP32, FP16, BF16); flux_bls casts
    component_dtypes: dict[str, str] = field(default_factory=dict)
    # str(gpu) -> {network: served model name}: the copies a flux_bls instance on that GPU calls
    networks_by_gpu: dict[str, dict[str, str]] | None = None
    preview_projection: dict[str, Any] | None = None  # preview.PreviewProjection.to_json()
    vae_scaling_factor: float = 1.0
    vae_shift_factor: float = 0.0
    random_weights: bool = False  # the networks serve random weights (what clients can tell)

    def __post_init__(self) -> None:
        _check_choice("flux_bls", "backend", self.backend, BACKENDS)
        _check_choice("flux_bls", "precision", self.precision, PRECISIONS)
        check_queue_limits(self.max_inflight, self.max_queue)

    def with_queue_overrides(self, environ: dict[str, str]) -> BlsOptions:
        """These options with MAX_INFLIGHT / MAX_QUEUE as the server's environment sets them."""
        changes = {}
        if environ.get(MAX_INFLIGHT_ENV):
            changes["max_inflight"] = parse_queue_limit("MAX_INFLIGHT", environ[MAX_INFLIGHT_ENV])
        if MAX_QUEUE_ENV in environ:
            changes["max_queue"] = parse_queue_limit("MAX_QUEUE", environ[MAX_QUEUE_ENV])
        return dataclasses.replace(self, **changes) if changes else self


def parse_queue_limit(name: str, text: str) -> int | None:
    """MAX_INFLIGHT or MAX_QUEUE from its text: a count; for MAX_QUEUE also `none` or empty (no
    bound). ConfigError naming the variable otherwise."""
    if name == "MAX_QUEUE" and text.strip().lower() in ("", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: must be a whole number{' or none' if name == 'MAX_QUEUE' else ''}, "
                          f"got {text!r}") from None
    if name == "MAX_INFLIGHT":
        check_queue_limits(value, None)
    else:
        check_queue_limits(1, value)
    return value


def check_queue_limits(max_inflight: int, max_queue: int | None) -> None:
    if max_inflight < 1:
        raise ConfigError(f"MAX_INFLIGHT (flux_bls.max_inflight): at least 1, got {max_inflight}")
    if max_queue is not None and max_queue < 0:
        raise ConfigError(f"MAX_QUEUE (flux_bls.max_queue): 0 or more (or none: no bound), got {max_queue}")


@dataclass(frozen=True)
class ModelDeployment:
    """How Triton runs one model of the repository (config.pbtxt beyond its tensors)."""

    name: str
    platform: str  # PLATFORMS
    kind: str = "KIND_CPU"  # KINDS
    gpus: tuple[int, ...] | None = None  # one instance group per listed GPU; None: every GPU
    instances: int = 1  # per group
    decoupled: bool = False

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ConfigError(f"{self.name}: platform must be one of {PLATFORMS}, got {self.platform!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def processes(self) -> int:
        """Instances Triton starts (each a process for a Python model): one group per listed GPU.
        Unpinned GPU instances go on every GPU; the supervisor counts what the config lists."""
        return self.instances * (len(self.gpus) if self.gpus else 1)

    @property
    def on_gpu(self) -> bool:
        return self.kind == "KIND_GPU" or self.platform == "tensorrt_plan"


@dataclass(frozen=True)
class RepositoryConfig:
    """Every model of a rendered repository."""

    models: tuple[ModelDeployment, ...]
    random_weights: bool = False  # said at start: the networks serve random weights

    @property
    def names(self) -> list[str]:
        return sorted(m.name for m in self.models)

    @property
    def uses_gpu(self) -> bool:
        return any(m.on_gpu for m in self.models)

    @property
    def gpus(self) -> set[int]:
        """The GPUs instance groups are pinned to (GPUS)."""
        return {gpu for m in self.models for gpu in (m.gpus or ())}

    def python_models(self) -> dict[str, ModelDeployment]:
        return {m.name: m for m in self.models if m.platform == "python"}

    def write(self, repository: str | Path) -> Path:
        path = Path(repository) / REPOSITORY_FILE
        path.write_text(json.dumps(to_json(self), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, repository: str | Path) -> RepositoryConfig:
        path = Path(repository) / REPOSITORY_FILE
        if not path.exists():
            raise ConfigError(f"{repository} has no {REPOSITORY_FILE}: run `make export` for it")
        return from_json(cls, json.loads(path.read_text()), REPOSITORY_FILE)


Options = TypeVar("Options", NetworkOptions, BlsOptions)


def options_parameter(options: NetworkOptions | BlsOptions) -> dict[str, str]:
    """The config.pbtxt parameter that carries a model's options."""
    return {OPTIONS_PARAMETER: json.dumps(to_json(options), sort_keys=True)}


def read_options(cls: type[Options], model_config: dict) -> Options:
    """A model's options from its Triton model config (as `initialize` gets it, or as
    `get_model_config(as_json=True)["config"]` returns it)."""
    parameters = model_config.get("parameters", {})
    if OPTIONS_PARAMETER not in parameters:
        raise ConfigError(f"model {model_config.get('name')!r} has no {OPTIONS_PARAMETER} parameter: "
                          "export the repository again (`make export`)")
    text = parameters[OPTIONS_PARAMETER]["string_value"]
    return from_json(cls, json.loads(text), f"{model_config.get('name')}.{OPTIONS_PARAMETER}")


def to_json(value: Any) -> Any:
    """A config object as JSON-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


T = TypeVar("T")


def from_json(cls: type[T], data: Any, where: str) -> T:
    """`cls` from JSON data, every field checked against its declared type; an unknown or
    mistyped field is a ConfigError naming it."""
    return _decode(cls, data, where)


def _decode(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be an object, got {value!r}")
        hints = typing.get_type_hints(hint)
        known = {f.name for f in dataclasses.fields(hint)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field; {hint.__name__} has {sorted(known)}")
        required = sorted(f.name for f in dataclasses.fields(hint) if f.name not in value
                          and f.default is dataclasses.MISSING
                          and f.default_factory is dataclasses.MISSING)
        if required:
            raise ConfigError(f"{where}.{required[0]}: missing; {hint.__name__} needs it")
        return hint(**{name: _decode(hints[name], item, f"{where}.{name}") for name, item in value.items()})
    if origin in (typing.Union, types.UnionType):  # Optional[X]: None, or an X
        if value is None and type(None) in args:
            return None
        return _decode(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        return tuple(_decode(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be an object, got {value!r}")
        return {_decode(args[0], k, where): _decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, float, str) and (type(value) is not hint):
        raise ConfigError(f"{where}: must be {hint.__name__}, got {value!r}")
    return value
