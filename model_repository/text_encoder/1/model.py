"""Triton Python model `text_encoder` (FLUX.2): the chat model's stacked hidden states, run by
PyTorch (CPU or CUDA per instance_group)."""

import triton_python_backend_utils as pb_utils

from flux_triton.adapters.components import ComponentModel


class TritonPythonModel(ComponentModel):
    name = "text_encoder"
    pb = pb_utils
