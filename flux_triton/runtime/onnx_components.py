"""A network served from its exported ONNX graph by onnxruntime, with the torch component's interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flux_triton.specs import ComponentSpec


class OnnxComponent:
    """Named torch tensors in, named torch tensors out, computed by an onnxruntime session."""

    def __init__(self, path: str | Path, spec: ComponentSpec, device: str = "cpu"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])}))
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.output_names = [t.name for t in spec.outputs]
        self.device = device

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {name: np.ascontiguousarray(value.cpu().numpy()) for name, value in inputs.items()}
        outputs = self.session.run(self.output_names, feed)
        return {name: torch.from_numpy(value).to(self.device)
                for name, value in zip(self.output_names, outputs)}
