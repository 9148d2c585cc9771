"""Component calls that survive bad days: bounded retries with backoff, and batch halving on OOM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

OOM_MARKERS = ("out of memory", "outofmemory", "out_of_memory")


class ComponentError(RuntimeError):
    """A component call failed; `model` names the component."""

    def __init__(self, model: str, message: str):
        super().__init__(f"{model}: {message}")
        self.model = model
        self.message = message


class OutOfMemory(ComponentError):
    """The component ran out of (device) memory for this batch."""


def classify_failure(model: str, message: str) -> ComponentError:
    """OutOfMemory when the message says so, else a plain ComponentError."""
    lowered = message.lower()
    kind = OutOfMemory if any(m in lowered for m in OOM_MARKERS) else ComponentError
    return kind(model, message)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed call is tried again, and how long to wait before each retry."""

    attempts: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def delay(self, retry: int) -> float:
        return min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)


@dataclass
class RecoveryStats:
    """What recovery did during one request (for metrics and the final response)."""

    retries: int = 0
    batch_splits: int = 0


Tensors = dict[str, torch.Tensor]


def split_batch(inputs: Tensors, batched: set[str]) -> tuple[Tensors, Tensors]:
    """Two halves along dim 0 of the `batched` inputs; the others go to both halves."""
    size = next(inputs[n].shape[0] for n in inputs if n in batched)
    half = size // 2
    first = {n: (v[:half] if n in batched else v) for n, v in inputs.items()}
    second = {n: (v[half:] if n in batched else v) for n, v in inputs.items()}
    return first, second


async def call_with_recovery(
    model: str,
    call: Callable[[Tensors], Awaitable[Tensors]],
    inputs: Tensors,
    batched: set[str],
    policy: RetryPolicy,
    stats: RecoveryStats,
) -> Tensors:
    """`call(inputs)`, retried on failure; on out-of-memory the batch is halved and each half run."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await call(inputs)
        except OutOfMemory:
            batch = max((inputs[n].shape[0] for n in inputs if n in batched), default=1)
            if batch < 2:
                raise
            stats.batch_splits += 1
            halves = [await call_with_recovery(model, call, half, batched, policy, stats)
                      for half in split_batch(inputs, batched)]
            return {name: torch.cat([h[name] for h in halves]) for name in halves[0]}
        except ComponentError as exc:
            if attempt == policy.attempts:
                raise ComponentError(model, f"failed after {attempt} attempts: {exc.message}") from exc
            stats.retries += 1
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")
