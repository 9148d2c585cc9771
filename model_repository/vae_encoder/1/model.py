"""Triton Python model `vae_encoder`: the network run by PyTorch (CPU or CUDA per instance_group)."""

import triton_python_backend_utils as pb_utils

from flux_triton.adapters.components import ComponentModel


class TritonPythonModel(ComponentModel):
    name = "vae_encoder"
    pb = pb_utils
