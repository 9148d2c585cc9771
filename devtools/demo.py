"""`make demo`: start tritonserver, stream one generation with the client, stop the server."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flux_triton.clients import stream_client
from flux_triton.server.launcher import TritonServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out")
    parser.add_argument("--preview-decoder", choices=["linear", "vae"], default="vae")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                        help="a LoRA adapter of the repository's LORA_DIR (repeatable)")
    args = parser.parse_args(argv)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    log = Path(args.out) / "tritonserver.log"
    server = TritonServer(Path(args.repository), args.http_port, args.grpc_port, args.metrics_port,
                          log_file=log)
    ready_s = server.start()
    print(f"tritonserver ready in {ready_s:.2f} s (log: {log})")
    try:
        return stream_client.main([
            "--url", f"127.0.0.1:{args.grpc_port}", "--prompt", args.prompt,
            "--seed", str(args.seed), "--out", args.out, "--preview-decoder", args.preview_decoder,
            *(option for lora in args.lora for option in ("--lora", lora)),
        ])
    finally:
        began = time.perf_counter()
        code = server.stop()
        print(f"tritonserver stopped (exit code {code}) in {time.perf_counter() - began:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
