"""config.pbtxt rendered from the tensor specs (`flux_triton.specs`) and each model's deployment
(`flux_triton.serving_config`)."""

from __future__ import annotations

from flux_triton.serving_config import ModelDeployment
from flux_triton.specs import ComponentSpec, TensorSpec


def _dims(spec: TensorSpec) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec.dims)


def _tensor(spec: TensorSpec) -> str:
    optional = "\n    optional: true" if spec.optional else ""
    dtype = "STRING" if spec.dtype == "BYTES" else spec.dtype  # config.pbtxt spells BYTES "STRING"
    return (f"  {{\n    name: \"{spec.name}\"\n    data_type: TYPE_{dtype}\n"
            f"    dims: [ {_dims(spec)} ]{optional}\n  }}")


def _io(spec: ComponentSpec) -> str:
    inputs = ",\n".join(_tensor(t) for t in spec.inputs)
    outputs = ",\n".join(_tensor(t) for t in spec.outputs)
    return f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(params: dict[str, str]) -> str:
    return "".join(
        f"parameters {{\n  key: \"{k}\"\n  value: {{ string_value: {_quote(v)} }}\n}}\n"
        for k, v in sorted(params.items())
    )


def _instance_groups(deployment: ModelDeployment) -> str:
    """The deployment's instances: on every GPU the server sees, or (`gpus`) a group on each
    listed GPU."""
    kind, count = deployment.kind, deployment.instances
    if deployment.gpus is None:
        groups = [f"  {{\n    count: {count}\n    kind: {kind}\n  }}"]
    else:
        groups = [f"  {{\n    count: {count}\n    kind: {kind}\n    gpus: [ {gpu} ]\n  }}"
                  for gpu in deployment.gpus]
    return "instance_group [\n" + ",\n".join(groups) + "\n]\n"


def python_model_config(spec: ComponentSpec, deployment: ModelDeployment,
                        params: dict[str, str]) -> str:
    """A Python-backend model config (max_batch_size 0: the batch is an explicit dim)."""
    policy = "model_transaction_policy {\n  decoupled: true\n}\n" if deployment.decoupled else ""
    return (
        f"name: \"{spec.name}\"\nbackend: \"python\"\nmax_batch_size: 0\n{policy}{_io(spec)}"
        f"{_instance_groups(deployment)}{_parameters(params)}"
    )


def ensemble_config(spec: ComponentSpec, steps: list[tuple[str, dict[str, str], dict[str, str]]]) -> str:
    """An ensemble config; each step is (model, {model input: ensemble tensor}, {model output: tensor})."""
    rendered = []
    for model, input_map, output_map in steps:
        maps = "".join(f"      input_map {{ key: \"{k}\" value: \"{v}\" }}\n" for k, v in input_map.items())
        maps += "".join(f"      output_map {{ key: \"{k}\" value: \"{v}\" }}\n"
                        for k, v in output_map.items())
        rendered.append(f"    {{\n      model_name: \"{model}\"\n      model_version: -1\n{maps}    }}")
    steps_text = ",\n".join(rendered)
    return (f"name: \"{spec.name}\"\nplatform: \"ensemble\"\nmax_batch_size: 0\n{_io(spec)}"
            f"ensemble_scheduling {{\n  step [\n{steps_text}\n  ]\n}}\n")


def tensorrt_model_config(spec: ComponentSpec, deployment: ModelDeployment) -> str:
    """A TensorRT plan model config; the plan's bindings carry the spec's names."""
    return (
        f"name: \"{spec.name}\"\nplatform: \"tensorrt_plan\"\nmax_batch_size: 0\n{_io(spec)}"
        f"{_instance_groups(deployment)}"
    )
