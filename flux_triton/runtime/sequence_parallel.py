"""One DiT across N ranks: diffusers' Ulysses context parallelism (`ContextParallelConfig`), the
sequence split over the ranks and the attention heads exchanged all-to-all.

Rank 0 lives in the caller's process (a served `dit_transformer` model, or the in-process runner)
and starts ranks 1..N-1 as worker processes of this module, one per device of the group (GPUs over
NCCL, or the CPU over gloo for tests). Every call of rank 0 hands its inputs to the workers
(`torch.distributed` broadcasts), and all ranks run the model together; the output is gathered on
every rank. A shape the sequence does not split evenly over (or a first-block-cache call, which
runs its blocks by hand) runs on rank 0 alone with the same weights. A worker that died is found
before the next call, or by the call that fails with it: the group is rebuilt and the call run
again, so a killed rank costs one restart, not a request.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.runtime.torch_components import load_component

log = logging.getLogger(__name__)
# A worker waits for the next call without end; a collective that stalls mid-call ends here.
GROUP_TIMEOUT = datetime.timedelta(days=30)
# The inputs diffusers' context-parallel plans split, and along which dim (FLUX.1 and FLUX.2).
SPLIT_INPUTS = {"hidden_states": 1, "encoder_hidden_states": 1}
LOCAL_ONLY_INPUTS = frozenset({"cache_threshold"})  # first-block caching runs blocks by hand
SHUTDOWN = "shutdown"
WORKER_START_S = 1800  # a worker's load of the DiT, at most


def ready_file(store: Path, rank: int) -> Path:
    """What a worker writes once its DiT is loaded, before it joins the group."""
    return store.with_name(f"ready-{rank}")


def python_executable() -> str:
    """The interpreter to start workers with: this one, or, inside an embedding process (Triton's
    Python backend stub), the `python` of the environment it runs in."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    candidate = Path(sys.prefix) / "bin" / "python"
    return str(candidate) if candidate.exists() else shutil.which("python3") or "python3"


def check_group(info: FluxModelInfo, size: int) -> None:
    """ValueError unless `info`'s DiT can run over `size` ranks: Ulysses gives each rank
    heads / size attention heads; and FLUX.1 only (diffusers' FLUX.2 plan splits 3-D position ids,
    where the served DiT takes 2-D ones)."""
    if size < 1:
        raise ValueError(f"SEQUENCE_PARALLEL must be 1 or more, got {size}")
    if size == 1:
        return
    if info.is_flux2:
        raise ValueError("SEQUENCE_PARALLEL is served for FLUX.1 models; this folder is FLUX.2 "
                         f"({info.pipeline_class}): export it with SEQUENCE_PARALLEL=1")
    if info.dit_heads % size:
        raise ValueError(f"SEQUENCE_PARALLEL={size} must divide the DiT's {info.dit_heads} attention "
                         "heads (each rank takes an equal share)")


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


@contextlib.contextmanager
def _rank_device(device: str):
    """diffusers picks a rank's device as `rank % accelerator count`, which fails on the CPU (no
    accelerator) and is wrong for a group that does not start at GPU 0: each rank gets its own."""
    target = torch.device(device)
    if target.type != "cuda":
        with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
            yield
        return
    torch.cuda.set_device(target)
    try:
        yield
    finally:
        torch.cuda.set_device(target)


def parallel_copy(component: torch.nn.Module, world_size: int, device: str) -> torch.nn.Module:
    """A second diffusers model over the same weight tensors as `component.model` (no copy), with
    Ulysses context parallelism over the initialised group of `world_size` ranks; returned as a
    component (the same forward, this model)."""
    from diffusers import ContextParallelConfig

    model = component.model
    with torch.device("meta"):
        twin = type(model).from_config(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    meta = [name for name, t in (*twin.named_parameters(), *twin.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"cannot share the weights of {type(model).__name__}: {meta[:3]} not shared")
    twin.eval()
    twin.set_attention_backend("native")
    with _rank_device(device):
        twin.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
    parallel = types.SimpleNamespace(model=twin)
    return lambda **inputs: type(component).forward(parallel, **inputs)


def materialized(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the gathered output: the functional all-gather hands back a tensor whose
    collective may still be in flight, which a consumer reading its memory directly (Triton's
    DLPack export) would see unfilled."""
    wait = getattr(tensor, "wait", None)  # torch's AsyncCollectiveTensor
    return (wait() if callable(wait) else tensor).clone()


def splits_evenly(inputs: dict[str, torch.Tensor], world_size: int) -> bool:
    """Whether every split input's sequence divides by the group's size (diffusers' plans need it)."""
    return all(inputs[name].shape[dim] % world_size == 0
               for name, dim in SPLIT_INPUTS.items() if name in inputs)


def _send(inputs: dict[str, torch.Tensor] | None, device: str) -> None:
    """Rank 0: the call's tensors (names, shapes, types first), or None to stop the workers."""
    header = None if inputs is None else [(n, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                                          for n, v in inputs.items()]
    dist.broadcast_object_list([header if inputs is not None else SHUTDOWN], src=0)
    for tensor in (inputs or {}).values():
        dist.broadcast(tensor.contiguous().to(device), src=0)


def _receive(device: str) -> dict[str, torch.Tensor] | None:
    """Workers: the next call's tensors, or None when rank 0 stops the group."""
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] == SHUTDOWN:
        return None
    inputs = {}
    for name, shape, dtype in box[0]:
        inputs[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(inputs[name], src=0)
    return inputs


class SequenceParallelDit:
    """The `dit_transformer` component run over the devices `devices` (rank r on devices[r]):
    call it with the component's inputs, get its outputs."""

    def __init__(self, info: FluxModelInfo, devices: tuple[str, ...], dtype: str = "float32",
                 component: torch.nn.Module | None = None):
        if len(devices) < 2:
            raise ValueError(f"sequence parallelism needs 2 or more devices, got {devices}")
        check_group(info, len(devices))
        self.info, self.devices, self.dtype = info, tuple(devices), dtype
        self.local = component if component is not None else load_component(
            "dit_transformer", info, devices[0], dtype)
        self.model = self.local.model  # what adapters and accelerations act on
        self.workers: list[subprocess.Popen] = []
        self.restarts = 0
        self.parallel_calls = 0
        self.local_calls = 0
        self.rendezvous: Path | None = None
        self.broken = False  # a call failed on a fresh group: the next call starts another
        self.lock = threading.Lock()
        self._start()

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def _start(self) -> None:
        self.rendezvous = Path(tempfile.mkdtemp(prefix="flux-sp-")) / "store"
        command = [python_executable(), "-m", "flux_triton.runtime.sequence_parallel",
                   "--model-dir", str(self.info.model_dir), "--dtype", self.dtype,
                   "--store", str(self.rendezvous), "--devices", ",".join(self.devices),
                   "--parent", str(os.getpid())]
        self.workers = [subprocess.Popen([*command, "--rank", str(rank)])
                        for rank in range(1, self.world_size)]
        self._wait_for_workers()
        store = dist.FileStore(str(self.rendezvous), self.world_size)
        dist.init_process_group(backend_for(self.devices[0]), store=store, rank=0,
                                world_size=self.world_size, timeout=GROUP_TIMEOUT)
        self.parallel = parallel_copy(self.local, self.world_size, self.devices[0])

    def _wait_for_workers(self) -> None:
        """Until every worker has loaded its DiT (it says so in a file beside the store): the
        group's rendezvous would wait for a worker that failed to start as long as for an idle one."""
        deadline = time.monotonic() + WORKER_START_S
        while not all(ready_file(self.rendezvous, rank).exists() for rank in range(1, self.world_size)):
            failed = [(rank, w.returncode) for rank, w in enumerate(self.workers, start=1)
                      if w.poll() is not None]
            if failed or time.monotonic() > deadline:
                self._stop(graceful=False)
                raise RuntimeError(f"sequence-parallel ranks did not start on {self.devices}: "
                                   f"{f'exited {failed}' if failed else f'not ready in {WORKER_START_S} s'}")
            time.sleep(0.05)

    def _stop(self, graceful: bool) -> None:
        if graceful and not self.broken and all(w.poll() is None for w in self.workers):
            with contextlib.suppress(Exception):
                _send(None, self.devices[0])
        for worker in self.workers:  # the workers go first: then no collective waits on them
            if graceful:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=10)
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        if self.rendezvous is not None:
            shutil.rmtree(self.rendezvous.parent, ignore_errors=True)

    def heal(self, reason: str) -> None:
        """Rebuild the group: stop what is left of it, start every worker again."""
        log.warning("sequence-parallel group of %s: %s; restarting it", self.devices, reason)
        self._stop(graceful=False)
        self.restarts += 1
        self.broken = False
        self._start()

    def dead_workers(self) -> list[int]:
        return [rank for rank, w in enumerate(self.workers, start=1) if w.poll() is not None]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if LOCAL_ONLY_INPUTS & inputs.keys() or not splits_evenly(inputs, self.world_size):
            self.local_calls += 1
            return self.local(**inputs)
        with self.lock:
            dead = self.dead_workers()
            if dead or self.broken:
                self.heal(f"rank(s) {dead} exited" if dead else "its last call failed")
            try:
                return self._parallel_call(inputs)
            except Exception as exc:  # a rank died mid-call: once more on a fresh group
                self.heal(f"a call failed ({type(exc).__name__}: {exc})")
                try:
                    return self._parallel_call(inputs)
                except Exception:
                    # the other ranks may still sit in this call's collectives: none of them is
                    # trusted again; the next call starts a fresh group
                    self.broken = True
                    raise

    def _parallel_call(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _send(inputs, self.devices[0])
        outputs = self.parallel(**inputs)
        self.parallel_calls += 1
        return {name: materialized(value) for name, value in outputs.items()}

    def close(self) -> None:
        with self.lock:
            self._stop(graceful=True)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _exit_with_parent(parent: int, rendezvous: Path) -> None:
    """A worker ends when the process that started it is gone (a collective may never return),
    taking the group's rendezvous folder with it."""
    def watch():
        while True:
            if os.getppid() != parent:
                shutil.rmtree(rendezvous, ignore_errors=True)
                os._exit(0)
            time.sleep(0.2)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def worker_main(argv: list[str] | None = None) -> int:
    """A rank > 0 of the group: load the DiT, join, then run every call rank 0 hands over."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--store", required=True)
    parser.add_argument("--devices", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _exit_with_parent(args.parent, Path(args.store).parent)
    devices = args.devices.split(",")
    device = devices[args.rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    info = load_model_info(args.model_dir)
    component = load_component("dit_transformer", info, device, args.dtype)
    ready_file(Path(args.store), args.rank).touch()
    dist.init_process_group(backend_for(device), store=dist.FileStore(args.store, len(devices)),
                            rank=args.rank, world_size=len(devices), timeout=GROUP_TIMEOUT)
    parallel = parallel_copy(component, len(devices), device)
    try:
        with torch.inference_mode():
            while (inputs := _receive(device)) is not None:
                parallel(**inputs)
    except Exception as exc:  # the group broke (rank 0 gone or restarting): this worker ends
        print(f"sequence-parallel rank {args.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(1)
    # rank 0 stopped the group: leave at once (rank 0 tears the group down once all are gone)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(worker_main())
