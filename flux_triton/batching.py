"""Batching across requests: concurrent calls of one model that fit together become one call.

Streams that generate at the same size and text length call the DiT with inputs of the same shape
but for the batch; at different steps they differ only in per-sample inputs (timestep, guidance),
which are batched too. `CallBatcher` holds the first call of a group for up to `delay_s`, adds the
calls that arrive meanwhile, runs them as one, and hands each caller its rows.

A time window alone rarely merges on a GPU: a DiT call takes far longer than any window, streams
drift out of phase, and a call that arrives while another runs waits in Triton's queue instead of
here (docs/scaling.md has the measurements). So at most
`max_in_flight` merged calls run at once (one per DiT instance: more would only queue in Triton);
a group whose window ends while they run stays open, and once one returns it gets a fresh window,
which lets the streams just answered join it with their next step. Streams then move in step.

Callers that say which stream they serve (`with batcher.stream():` around a request) spare the
wait when nobody else can come: once every active stream has a call waiting, those calls run at
once, so a lone stream pays no window at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]
_current_stream: ContextVar[object | None] = ContextVar("flux_batcher_stream", default=None)


@dataclass
class _Group:
    context: Hashable = None  # what every call of the group runs with (CallBatcher.submit)
    calls: list[tuple[Tensors, asyncio.Future]] = field(default_factory=list)
    streams: set = field(default_factory=set)  # the streams (see CallBatcher.stream) with a call here
    rows: int = 0
    # None once its window ended while the in-flight calls were all taken: it waits for one to return
    timer: asyncio.TimerHandle | None = None


class CallBatcher:
    """Merges concurrent `call(inputs, context)`s whose inputs agree on everything but their first
    (batch) dim and whose `context` is the same (e.g. the LoRA adapters they run with): the
    `batched` inputs are concatenated, the others must be equal (they are shared).
    """

    def __init__(self, call: Callable[[Tensors, Hashable], Awaitable[Tensors]], batched: set[str],
                 delay_s: float, max_rows: int, on_batch: Callable[[int, int], None] | None = None,
                 max_in_flight: int = 1):
        self.call = call
        self.on_batch = on_batch  # (rows, calls merged) of every call run
        self.batched = batched
        self.delay_s = delay_s
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.groups: dict[tuple, _Group] = {}  # open: still taking calls
        self.closed: deque[_Group] = deque()  # full or displaced, waiting for a free call
        self.active_streams = 0

    @contextmanager
    def stream(self) -> Iterator[None]:
        """Mark the calls submitted inside (and in tasks started inside) as one stream's, for as
        long as the stream lasts: see the module's docstring."""
        token = _current_stream.set(object())
        self.active_streams += 1
        try:
            yield
        finally:
            self.active_streams -= 1
            _current_stream.reset(token)
            self._run_if_all_waiting()

    def _run_if_all_waiting(self) -> None:
        """Close every open group once each active stream has a call waiting (none can join)."""
        if not self.groups or not self.active_streams:
            return
        waiting = set().union(*(g.streams for g in self.groups.values()),
                              *(g.streams for g in self.closed))
        if len(waiting) >= self.active_streams:
            for key in list(self.groups):
                self._flush(key)

    def _key(self, inputs: Tensors, context: Hashable) -> tuple:
        return (context, tuple(sorted(
            (name, tuple(v.shape[1:]) if name in self.batched else tuple(v.shape), v.dtype, v.device)
            for name, v in inputs.items())))

    def _rows(self, inputs: Tensors) -> int:
        return max((v.shape[0] for n, v in inputs.items() if n in self.batched), default=1)

    async def submit(self, inputs: Tensors, context: Hashable = None) -> Tensors:
        """The outputs of `call(inputs, context)`, computed alone or with other concurrent calls
        of the same context."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        rows = self._rows(inputs)
        key = self._key(inputs, context)
        group = self.groups.get(key)
        if group is not None and (group.rows + rows > self.max_rows or not self._shares(group, inputs)):
            self._flush(key)  # no room (or other shared inputs): run what is waiting, start afresh
            group = None
        if group is None:
            group = self.groups[key] = _Group(context)
            self._open_window(key, group)
        group.calls.append((inputs, future))
        group.rows += rows
        stream = _current_stream.get()
        if stream is not None:
            group.streams.add(stream)
            # after the calls gathered with this one (true CFG's pair) have been submitted too
            loop.call_soon(self._run_if_all_waiting)
        if group.rows >= self.max_rows:
            self._flush(key)
        return await future

    def _shares(self, group: _Group, inputs: Tensors) -> bool:
        first = group.calls[0][0]
        return all(torch.equal(first[n], v) for n, v in inputs.items() if n not in self.batched)

    def _open_window(self, key: tuple, group: _Group) -> None:
        group.timer = asyncio.get_running_loop().call_later(self.delay_s, self._window_ended, key)

    def _window_ended(self, key: tuple) -> None:
        group = self.groups.get(key)
        if group is None:
            return
        group.timer = None
        if self.in_flight < self.max_in_flight:
            self._flush(key)
        # else it stays open, without a window, until a call returns (see _call_returned)

    def _flush(self, key: tuple) -> None:
        """Close the group of `key` (it takes no more calls) and run it when a call is free."""
        group = self.groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        self.closed.append(group)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.closed and self.in_flight < self.max_in_flight:
            self.in_flight += 1
            asyncio.get_running_loop().create_task(self._run(self.closed.popleft()))

    def _call_returned(self) -> None:
        self.in_flight -= 1
        self._dispatch()
        for key, group in self.groups.items():
            if group.timer is None:  # a fresh window: the callers just answered can join with their next call
                self._open_window(key, group)

    async def _run(self, group: _Group) -> None:
        try:
            await self._run_merged(group)
        finally:
            self._call_returned()

    async def _run_merged(self, group: _Group) -> None:
        calls = [(inputs, future) for inputs, future in group.calls if not future.cancelled()]
        if not calls:
            return
        if len(calls) == 1:
            merged = calls[0][0]
        else:
            merged = {name: (torch.cat([c[0][name] for c in calls]) if name in self.batched else value)
                      for name, value in calls[0][0].items()}
        if self.on_batch is not None:
            self.on_batch(self._rows(merged), len(calls))
        try:
            outputs = await self.call(merged, group.context)
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
