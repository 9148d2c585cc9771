"""Test-only failures, enabled solely by the server's environment (FLUX_TRITON_FAULT_DIR)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from flux_triton.specs import ComponentSpec

FAULTS_ENV = "FLUX_TRITON_FAULT_DIR"


class InjectedUnavailable(RuntimeError):
    """An injected transient failure: the component answers UNAVAILABLE."""


class FaultInjector:
    """Failures planned in `<FLUX_TRITON_FAULT_DIR>/<model>.json`; no client input can reach them.

    The plan may hold {"fail_next": n} (the next n calls fail as UNAVAILABLE, a transient error),
    {"error_next": n} (the next n calls fail with a deterministic INTERNAL error),
    {"oom_min_batch": k} (every call with a batch of k or more runs out of memory),
    {"delay_ms": t} (every call takes t ms longer) and {"hang_next": n} (the next n calls never
    return: the process sleeps, alive, in state S).
    """

    def __init__(self, spec: ComponentSpec):
        fault_dir = os.environ.get(FAULTS_ENV)
        self.plan = Path(fault_dir) / f"{spec.name}.json" if fault_dir else None
        self.batched = spec.batched_inputs()

    def check(self, inputs: dict[str, torch.Tensor]) -> None:
        if self.plan is None or not self.plan.exists():
            return
        plan = json.loads(self.plan.read_text())
        time.sleep(plan.get("delay_ms", 0) / 1000)
        if plan.get("hang_next", 0) > 0:
            plan["hang_next"] -= 1
            self.plan.write_text(json.dumps(plan))
            while True:
                time.sleep(3600)
        for key, failure in (("fail_next", InjectedUnavailable), ("error_next", RuntimeError)):
            if plan.get(key, 0) > 0:
                plan[key] -= 1
                self.plan.write_text(json.dumps(plan))
                raise failure(f"injected failure ({key})")
        batch = max((v.shape[0] for n, v in inputs.items() if n in self.batched), default=1)
        if batch >= plan.get("oom_min_batch", 1 << 30):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected for batch {batch})")
