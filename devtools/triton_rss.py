"""tritonserver's own resident memory per 1,000 streams of each kind (CPU, tiny schnell, 4
clients): successful ones on one connection and on a new connection each, invalid ones (an error
at once), ones the client cancels after a step, ones whose client drops the connection, and ones
refused for a full queue (MAX_INFLIGHT=1, MAX_QUEUE=0, one long request holding the slot).

    python -m devtools.triton_rss --out benchmarks/results/triton-rss-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from devtools.processes import free_port
from devtools.soak import rss_by_process
from flux_triton.clients.stream_client import build_inputs, stream_generate
from flux_triton.export.repository import write_repository
from flux_triton.server.launcher import TritonServer, jemalloc_path
from flux_triton.server.supervisor import SERVER

FIELDS = dict(prompt="x", height=64, width=64, num_inference_steps=1, preview_kind="none")
KINDS = ("reused", "new_connection", "invalid", "cancelled", "dropped", "refused")


def one(url: str, client, kind: str, seed: int) -> None:
    if kind in ("reused", "refused"):
        stream_generate(client, build_inputs(seed=seed, **FIELDS))
    elif kind == "new_connection":
        fresh = grpcclient.InferenceServerClient(url)
        stream_generate(fresh, build_inputs(seed=seed, **FIELDS))
        fresh.close()
    elif kind == "invalid":
        stream_generate(client, build_inputs(prompt="x", height=100))
    elif kind == "cancelled":
        stream_generate(client, build_inputs(seed=seed, **dict(FIELDS, num_inference_steps=6,
                                                                 preview_kind="latent")),
                        stop_after_steps=1)
    else:  # dropped: the connection closes mid-stream
        fresh, got = grpcclient.InferenceServerClient(url), threading.Event()
        fresh.start_stream(callback=lambda result, error: got.set())
        fresh.async_stream_infer("flux_bls", build_inputs(seed=seed, **dict(
            FIELDS, num_inference_steps=6, preview_kind="latent")))
        got.wait(1)
        fresh.close()


def streams(url: str, kind: str, count: int, clients: int = 4) -> None:
    def worker(index: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        for seed in range(index, count, clients):
            one(url, client, kind, seed)
        client.close()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny-flux-schnell"))
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 1,000 per kind")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="triton-rss-"))
    repository = write_repository(args.model_dir, workdir / "repository", max_inflight=1, max_queue=0)
    server = TritonServer(repository, free_port(), free_port(), free_port(),
                          log_file=workdir / "tritonserver.log")
    server.start()
    url = f"127.0.0.1:{server.grpc_port}"

    def rss_mib() -> float:
        return round(rss_by_process(server)[(SERVER, server.process.pid)] / 2**20, 2)

    result = {"allocator": jemalloc_path() or "glibc", "rounds": {}}
    try:
        streams(url, "reused", 200)
        result["warm_mib"] = rss_mib()
        holding = threading.Event()
        for kind in KINDS:
            holder = None
            if kind == "refused":  # one long request holds the only slot
                def hold():
                    client = grpcclient.InferenceServerClient(url)
                    while not holding.is_set():
                        stream_generate(client, build_inputs(**dict(FIELDS, num_inference_steps=40)))
                    client.close()
                holder = threading.Thread(target=hold)
                holder.start()
                time.sleep(1)
            result["rounds"][kind] = []
            for _ in range(args.rounds):
                streams(url, kind, 1000)
                result["rounds"][kind].append(rss_mib())
                print(f"{kind}: {result['rounds'][kind]} MiB", flush=True)
            if holder is not None:
                holding.set()
                holder.join()
    finally:
        server.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
