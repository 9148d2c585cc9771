"""Runtimes of the networks: PyTorch modules, ONNX Runtime sessions, and the pipeline in one process."""
