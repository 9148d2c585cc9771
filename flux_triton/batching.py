"""Batching across requests: concurrent calls of one model that fit together become one call.

Streams that generate at the same size and text length call the DiT with inputs of the same shape
but for the batch; at different steps they differ only in per-sample inputs (timestep, guidance),
which are batched too. `CallBatcher` holds the first call of a group for up to `delay_s`, adds the
calls that arrive meanwhile, runs them as one, and hands each caller its rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]


@dataclass
class _Group:
    calls: list[tuple[Tensors, asyncio.Future]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class CallBatcher:
    """Merges concurrent `call(inputs)`s whose inputs agree on everything but their first (batch)
    dim: the `batched` inputs are concatenated, the others must be equal (they are shared).

    `sizes` counts the batch sizes run, for metrics and tests.
    """

    def __init__(self, call: Callable[[Tensors], Awaitable[Tensors]], batched: set[str],
                 delay_s: float, max_rows: int, on_batch: Callable[[int, int], None] | None = None):
        self.call = call
        self.on_batch = on_batch  # (rows, calls merged) of every call run
        self.batched = batched
        self.delay_s = delay_s
        self.max_rows = max_rows
        self.groups: dict[tuple, _Group] = {}
        self.sizes: list[int] = []

    def _key(self, inputs: Tensors) -> tuple:
        return tuple(sorted(
            (name, tuple(v.shape[1:]) if name in self.batched else tuple(v.shape), v.dtype, v.device)
            for name, v in inputs.items()))

    def _rows(self, inputs: Tensors) -> int:
        return max((v.shape[0] for n, v in inputs.items() if n in self.batched), default=1)

    async def submit(self, inputs: Tensors) -> Tensors:
        """The outputs of `call(inputs)`, computed alone or with other concurrent calls."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        rows = self._rows(inputs)
        key = self._key(inputs)
        group = self.groups.get(key)
        if group is not None and (group.rows + rows > self.max_rows or not self._shares(group, inputs)):
            self._flush(key)  # no room (or other shared inputs): run what is waiting, start afresh
            group = None
        if group is None:
            group = self.groups[key] = _Group()
            group.timer = loop.call_later(self.delay_s, self._flush, key)
        group.calls.append((inputs, future))
        group.rows += rows
        if group.rows >= self.max_rows:
            self._flush(key)
        return await future

    def _shares(self, group: _Group, inputs: Tensors) -> bool:
        first = group.calls[0][0]
        return all(torch.equal(first[n], v) for n, v in inputs.items() if n not in self.batched)

    def _flush(self, key: tuple) -> None:
        group = self.groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        asyncio.get_running_loop().create_task(self._run(group))

    async def _run(self, group: _Group) -> None:
        calls = [(inputs, future) for inputs, future in group.calls if not future.cancelled()]
        if not calls:
            return
        if len(calls) == 1:
            merged = calls[0][0]
        else:
            merged = {name: (torch.cat([c[0][name] for c in calls]) if name in self.batched else value)
                      for name, value in calls[0][0].items()}
        self.sizes.append(self._rows(merged))
        if self.on_batch is not None:
            self.on_batch(self.sizes[-1], len(calls))
        try:
            outputs = await self.call(merged)
        except Exception as exc:  # every caller of the merged call sees its failure
            for _, future in calls:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for inputs, future in calls:
            rows = self._rows(inputs)
            if not future.done():
                future.set_result({name: value[start:start + rows] for name, value in outputs.items()})
            start += rows
