"""Triton Python model `flux_bls`: decoupled, streams one response per denoising step, then the image."""

import triton_python_backend_utils as pb_utils

from flux_triton.adapters.bls import FluxBlsModel


class TritonPythonModel(FluxBlsModel):
    pb = pb_utils
