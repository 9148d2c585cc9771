"""LoRA adapters served by name: the catalog of an adapter folder (`LORA_DIR`), read from the
safetensors headers alone. No tensor is loaded here and nothing but safetensors is ever read (no
pickles); an adapter that cannot be served is listed with the reason, never loaded.

`<LORA_DIR>/<name>/pytorch_lora_weights.safetensors` is what `FluxPipeline.save_lora_weights`
writes; a folder holding one other `.safetensors` file (kohya, xlabs or BFL keys, which diffusers'
`FluxPipeline.lora_state_dict` converts) is served too. stdlib only.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on a header
_LOWER = re.compile(r"\.(lora_A|lora_down|down)(\.weight)?$")  # the first matrix of a LoRA pair


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter of the catalog, as its file's header describes it."""

    name: str
    path: Path  # the safetensors file
    rank: int
    key_format: str  # diffusers (peft), kohya, xlabs or bfl
    targets: tuple[str, ...]  # the kinds of layer it adapts (to_q, proj_mlp, q_proj, ...)
    text_encoder: bool  # it also adapts CLIP (diffusers' FLUX loader applies those layers too)
    size_bytes: int

    def describe(self) -> dict:
        """What a client is told of it."""
        described = asdict(self)
        del described["path"]
        described["targets"] = list(self.targets)  # as JSON has it
        return described


@dataclass(frozen=True)
class LoraCatalog:
    """The adapters of a folder by name, and the folders that cannot be served, with why."""

    folder: Path | None
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.adapters)

    def describe(self) -> dict:
        """What a client is told: the adapters, and what cannot be served with why."""
        return {"loras": [self.adapters[name].describe() for name in self.names],
                "unavailable": dict(sorted(self.problems.items()))}

    def lines(self) -> list[str]:
        """One line per adapter and per problem, for a log."""
        lines = [f"LoRA {a.name}: rank {a.rank}, {a.key_format} keys, {', '.join(a.targets)}"
                 f"{' + CLIP' if a.text_encoder else ''}, {a.size_bytes / 2**10:.0f} KiB"
                 for a in self.adapters.values()]
        return lines + [f"LoRA {name}: not served: {why}" for name, why in sorted(self.problems.items())]


class NotALora(ValueError):
    """A file that is not a LoRA adapter this server can load; the message says why."""


def read_catalog(folder: str | Path | None) -> LoraCatalog:
    """Every adapter of `folder` (no folder: none)."""
    if folder is None or not Path(folder).is_dir():
        return LoraCatalog(None if folder is None else Path(folder))
    folder = Path(folder)
    adapters, problems = {}, {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue
        if not NAME.fullmatch(entry.name):
            problems[entry.name] = f"a name is {NAME.pattern}"
            continue
        try:
            adapters[entry.name] = read_adapter(entry)
        except (NotALora, OSError) as exc:
            problems[entry.name] = str(exc)
    return LoraCatalog(folder, adapters, problems)


def read_adapter(folder: Path) -> LoraAdapter:
    """The adapter in `folder`, from its file's header; NotALora when it is none."""
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        candidates = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if len(candidates) != 1:
            raise NotALora(f"needs {WEIGHTS_FILE} or one .safetensors file, found "
                           f"{[p.name for p in candidates] or 'none'}")
        weights = candidates[0]
    if weights.is_symlink():
        raise NotALora(f"{weights.name} is a symbolic link")
    tensors = safetensors_header(weights)
    lower = {key: spec for key, spec in tensors.items() if _LOWER.search(key)}
    if not lower:
        raise NotALora(f"{weights.name} holds no LoRA weights (no lora_A / lora_down keys)")
    ranks = {spec["shape"][0] for spec in lower.values()}
    keys = list(tensors)
    return LoraAdapter(
        name=folder.name, path=weights, rank=max(ranks), key_format=_key_format(keys),
        targets=tuple(sorted({_layer_kind(_LOWER.split(key)[0]) for key in lower})),
        text_encoder=any(k.startswith(("text_encoder.", "lora_te")) for k in keys),
        size_bytes=weights.stat().st_size)


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares (name -> dtype, shape, offsets), checked against
    the file's size; NotALora for anything else."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise NotALora(f"{path.name} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise NotALora(f"{path.name} is not a safetensors file (a header of {length} bytes in a "
                           f"file of {size})")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise NotALora(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise NotALora(f"{path.name} is not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, spec in header.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data):
            raise NotALora(f"{path.name}: tensor {name[:80]!r} is malformed")
    return header


def _layer_kind(path: str) -> str:
    """The layer a key adapts, less its block: `transformer.transformer_blocks.3.attn.to_q` ->
    `attn.to_q` (the part after the first index)."""
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[index + 1:] if index is not None and index + 1 < len(parts) else parts[1:])


def _key_format(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "bfl"
    return "diffusers"
