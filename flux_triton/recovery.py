"""Component calls that survive bad days: bounded retries with backoff, and batch halving on OOM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from flux_triton.errors import mentions_out_of_memory, reported_status
from flux_triton.serving_config import RetryPolicy


class ComponentError(RuntimeError):
    """A component call failed; `model` names the component, `retryable` says if trying again may
    help (a transient failure) rather than fail the same way (a deterministic one)."""

    def __init__(self, model: str, message: str, retryable: bool = False):
        super().__init__(f"{model}: {message}")
        self.model = model
        self.message = message
        self.retryable = retryable


class OutOfMemory(ComponentError):
    """The component ran out of (device) memory for this batch."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors, on any device."""
    return isinstance(exc, torch.OutOfMemoryError) or mentions_out_of_memory(str(exc))


def classify_failure(model: str, message: str, code: str | None) -> ComponentError:
    """What a failed component call means, decided by its status code (`errors.reported_status`).

    UNAVAILABLE: transient (the model is loading, unloading or its process is restarting), retried.
    INTERNAL: deterministic, not retried; except an out-of-memory, whose batch is halved.
    Any other code (INVALID_ARG, CANCELLED, ...): final. Only when no code is set does the text
    decide: out-of-memory as above, anything else retried.
    """
    status = reported_status(code, message)
    out_of_memory = mentions_out_of_memory(message)
    if status == "UNAVAILABLE":
        return ComponentError(model, message, retryable=True)
    if status in (None, "INTERNAL") and out_of_memory:
        return OutOfMemory(model, message)
    return ComponentError(model, message, retryable=status is None)


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
    """`call(inputs)`, retried on transient failures; on out-of-memory the batch is halved and each
    half run; a deterministic failure is raised at once."""
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
            if not exc.retryable:
                raise
            if attempt == policy.attempts:
                raise ComponentError(model, f"failed after {attempt} attempts: {exc.message}",
                                     retryable=True) from exc
            stats.retries += 1
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")
