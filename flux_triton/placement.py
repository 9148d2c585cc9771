"""Which copy of each network a GPU runs when one server spans several GPUs (`GPUS`).

Triton sends a BLS request to any instance of the model it names, whatever GPU the caller is on,
so every listed GPU gets its own copy of each network, named by the rule below, and a `flux_bls`
instance calls the copies on its own GPU by name. The first listed GPU's copies keep the plain
names: the `encode_prompt` ensemble and clients that decode previews with `vae_decoder` call those.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from flux_triton.specs import ALL_NETWORKS, NETWORKS

_COPY_NAME = re.compile(rf"^({'|'.join(ALL_NETWORKS)})_gpu(\d+)$")


def parse_gpus(text: str, device_count: Callable[[], int]) -> tuple[int, ...]:
    """The GPU ids `GPUS` lists: `all` (every GPU `device_count` finds) or ids such as `0,1`."""
    text = text.strip()
    if text == "all":
        count = device_count()
        if count < 1:
            raise ValueError("GPUS=all found no GPU on this machine; list the GPU ids, e.g. GPUS=0,1")
        return tuple(range(count))
    if not text:
        raise ValueError("GPUS is empty: give `all` or GPU ids, e.g. GPUS=0,1")
    gpus = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"GPUS lists GPU ids (0,1,...) or says `all`; {part!r} in {text!r} is "
                             "not a GPU id")
        if int(part) in gpus:
            raise ValueError(f"GPUS lists GPU {int(part)} twice in {text!r}")
        gpus.append(int(part))
    return tuple(gpus)


def sequence_parallel_groups(gpus: Sequence[int], size: int) -> tuple[tuple[int, ...], ...]:
    """The GPUs in groups of `size` (SEQUENCE_PARALLEL), in the order listed: each group serves
    one DiT over all its GPUs, its first GPU holds the other networks and the flux_bls instance."""
    if size < 1:
        raise ValueError(f"SEQUENCE_PARALLEL must be 1 or more, got {size}")
    if len(gpus) % size:
        raise ValueError(f"SEQUENCE_PARALLEL={size} makes groups of {size} GPUs, but GPUS lists "
                         f"{len(gpus)} ({list(gpus)}): list a multiple of {size}")
    return tuple(tuple(gpus[i:i + size]) for i in range(0, len(gpus), size))


def network_copy_name(network: str, gpu: int, gpus: Sequence[int]) -> str:
    """The served name of `network`'s copy on `gpu`: plain on the first listed GPU, else
    `<network>_gpu<gpu>`."""
    return network if gpu == gpus[0] else f"{network}_gpu{gpu}"


def copied_network(model: str) -> str | None:
    """The network a `<network>_gpu<k>` model is a copy of (None for any other name)."""
    match = _COPY_NAME.match(model)
    return match.group(1) if match else None


def networks_by_gpu(gpus: Sequence[int], networks: Sequence[str] = NETWORKS
                    ) -> dict[str, dict[str, str]]:
    """For each listed GPU (as a string, JSON's key type), the model each network's calls go to."""
    return {str(gpu): {n: network_copy_name(n, gpu, gpus) for n in networks} for gpu in gpus}


def served_networks(mapping: dict[str, dict[str, str]] | None, gpu: int | None,
                    networks: Sequence[str] = NETWORKS) -> dict[str, str]:
    """The model each network's calls go to from a `flux_bls` instance on `gpu`, given its
    `networks_by_gpu` option; the plain names when the repository has no such map."""
    if not mapping:
        return {n: n for n in networks}
    if str(gpu) not in mapping:
        raise ValueError(f"flux_bls instance on GPU {gpu} but networks_by_gpu maps only "
                         f"GPUs {sorted(mapping)}: export again with the GPUS this server runs on")
    return dict(mapping[str(gpu)])
