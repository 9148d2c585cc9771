"""Triton Python model `tokenizer`: prompts -> CLIP ids and T5 ids, as FluxPipeline tokenizes."""

import triton_python_backend_utils as pb_utils

from flux_triton.adapters.components import TokenizerModel


class TritonPythonModel(TokenizerModel):
    pb = pb_utils
