"""Triton Python model `tokenizer`: prompts -> CLIP ids and T5 ids, as FluxPipeline tokenizes."""

import numpy as np
import triton_python_backend_utils as pb_utils

from flux_triton.components import load_component
from flux_triton.model_info import load_model_info
from flux_triton.python_backend import error_response, from_torch, model_parameters


def _strings(request, name: str) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        info = load_model_info(model_parameters(args)["model_dir"])
        self.tokenizer = load_component("tokenizer", info)
        self.max_length = info.t5_max_length

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompts, prompts_2 = _strings(request, "prompt"), _strings(request, "prompt_2")
                if len(prompts) != len(prompts_2):
                    raise ValueError(f"`prompt_2` must hold {len(prompts)} strings, got {len(prompts_2)}")
                max_seq = pb_utils.get_input_tensor_by_name(request, "max_sequence_length").as_numpy()
                max_seq = int(np.asarray(max_seq).reshape(-1)[0])
                if not 1 <= max_seq <= self.max_length:
                    raise ValueError(
                        f"`max_sequence_length` must be in [1, {self.max_length}], got {max_seq}"
                    )
                ids = self.tokenizer(prompts, prompts_2, max_seq)
                responses.append(pb_utils.InferenceResponse(
                    [from_torch(pb_utils, name, value) for name, value in ids.items()]
                ))
            except ValueError as exc:
                responses.append(error_response(pb_utils, f"tokenizer: {exc}", "INVALID_ARG"))
            except Exception as exc:
                responses.append(error_response(pb_utils, f"tokenizer: {type(exc).__name__}: {exc}"))
        return responses
