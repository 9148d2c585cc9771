"""The HTTP gateway: OpenAI-style images API, Server-Sent Events previews and a live web page, in
front of the Triton server (gRPC only; no torch)."""
