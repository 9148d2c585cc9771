"""Admission of generations to one `flux_bls` instance (one GPU): at most `max_inflight` run at
once, the others wait first in, first out, and past `max_queue` waiting requests on the whole
server the next one is refused at once.

The queue's length is the server's: with several instances (GPUS) each publishes how many of its
requests wait on the load board (`flux_triton.dispatch`), and a request is let in line only while
the sum stays under `max_queue`, decided under the board's lock. Each instance runs its own line:
least-loaded dispatch sends a new request to the GPU with the fewest requests, so the lines stay
even, and a request's place is its place in the line of the GPU that will run it.

Requests may name whose they are (`key`): the line then serves the keys in turn, round-robin,
each key's own requests first in, first out, so that one client's burst cannot starve another
(the gateway's line, one key per API key). Without keys it is one first-in-first-out line.

Runs on one asyncio loop; nothing here is thread-safe by itself, except `Admission.refusal`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class QueueFull(Exception):
    """The server's queue holds `max_queue` requests: this one is refused."""

    def __init__(self, max_queue: int, retry_after_s: int):
        super().__init__(f"the queue is full ({max_queue} requests waiting, MAX_QUEUE={max_queue})")
        self.max_queue, self.retry_after_s = max_queue, retry_after_s


class WaitingCount(Protocol):
    """Where the server's waiting requests are counted (`dispatch.LoadBoard`)."""

    def join_queue(self, max_queue: int | None) -> bool: ...

    def leave_queue(self) -> None: ...

    def waiting_total(self) -> int: ...


class LocalCount:
    """The count of a server with one instance."""

    def __init__(self):
        self.waiting = 0

    def join_queue(self, max_queue: int | None) -> bool:
        if max_queue is not None and self.waiting >= max_queue:
            return False
        self.waiting += 1
        return True

    def leave_queue(self) -> None:
        self.waiting -= 1

    def waiting_total(self) -> int:
        return self.waiting


@dataclass(eq=False)
class Ticket:
    """One request's place: waiting (with its `position`, 1 = next) or running."""

    key: str = ""
    arrived: float = field(default_factory=time.monotonic)
    position: int | None = None  # None once it runs (or left)
    on_position: Callable[[int], None] | None = None  # told each new place in line
    turn: asyncio.Future | None = None
    started: float | None = None
    running: bool = False
    done: bool = False

    @property
    def waited_s(self) -> float:
        return (self.started or time.monotonic()) - self.arrived


class Admission:
    """The running requests and the line of one instance (or of the gateway)."""

    def __init__(self, max_inflight: int, max_queue: int | None = None,
                 count: WaitingCount | None = None):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more (or None: no bound), got {max_queue}")
        self.max_inflight, self.max_queue = max_inflight, max_queue
        self.count = count or LocalCount()
        self.running = 0
        self.lines: dict[str, deque[Ticket]] = {}  # key -> its waiting tickets, oldest first
        self.rotation: deque[str] = deque()  # the keys with waiting tickets, the next one first
        self.recent_s: deque[float] = deque(maxlen=32)  # how long recent requests ran

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self.lines.values())

    def order(self) -> list[Ticket]:
        """The waiting tickets in the order they will run."""
        lines = {key: list(line) for key, line in self.lines.items()}
        order, depth, waiting = [], 0, self.waiting
        while len(order) < waiting:
            order += [lines[key][depth] for key in self.rotation if depth < len(lines[key])]
            depth += 1
        return order

    def enter(self, on_position: Callable[[int], None] | None = None, key: str = "") -> Ticket:
        """A ticket that runs at once, or waits in line (its `on_position` told its place now and
        whenever it changes); QueueFull when the queue is full."""
        ticket = Ticket(key=key, on_position=on_position)
        if self.running < self.max_inflight and not self.rotation:
            self._start(ticket)
            return ticket
        if not self.count.join_queue(self.max_queue):
            raise QueueFull(self.max_queue or 0, self.retry_after_s())
        ticket.turn = asyncio.get_running_loop().create_future()
        if key not in self.lines:
            self.lines[key] = deque()
            self.rotation.append(key)
        self.lines[key].append(ticket)
        self._tell_places()
        return ticket

    async def wait(self, ticket: Ticket, should_stop: Callable[[], object | None] | None = None,
                   poll_s: float = 0.25) -> object | None:
        """Until `ticket` may run (None), or `should_stop`, asked every `poll_s` while it waits,
        said why not (its answer: the ticket has left the line). Cancelling the waiting task also
        takes the ticket out of line."""
        try:
            while not ticket.running:
                if should_stop is None:
                    await asyncio.shield(ticket.turn)
                    break
                try:
                    await asyncio.wait_for(asyncio.shield(ticket.turn), poll_s)
                except asyncio.TimeoutError:
                    pass
                if ticket.running:
                    break
                reason = should_stop()
                if reason is not None:
                    self.leave(ticket)
                    return reason
        except asyncio.CancelledError:
            self.leave(ticket)
            raise
        return None

    def leave(self, ticket: Ticket) -> None:
        """`ticket` is done (it ran) or gave up its place; the line moves on."""
        if ticket.done:
            return
        ticket.done = True
        if ticket.running:
            self.running -= 1
            self.recent_s.append(time.monotonic() - ticket.started)
        else:
            self._remove(ticket)
            self.count.leave_queue()
        while self.rotation and self.running < self.max_inflight:
            key = self.rotation[0]
            head = self.lines[key][0]
            self._remove(head)
            if key in self.lines:  # its other requests wait for the other keys' turns
                self.rotation.rotate(-1)
            self.count.leave_queue()
            self._start(head)
            head.turn.set_result(None)
        self._tell_places()

    def retry_after_s(self, waiting: int | None = None) -> int:
        """About when a refused request could find room: the line's length (`waiting`, default
        this instance's) in rounds of `max_inflight` recent run times (1 s at least)."""
        recent = sorted(self.recent_s)  # one C-level copy: safe while the loop appends
        typical = recent[len(recent) // 2] if recent else 1.0
        rounds = ((self.waiting if waiting is None else waiting) + self.running) / self.max_inflight
        return max(1, round(typical * rounds))

    def refusal(self) -> QueueFull | None:
        """QueueFull if a request arriving now would be refused (every run slot taken and the
        server's queue full), else None. It reads counters only, so another thread (Triton's
        `execute`) may ask while the loop runs, and refuse without waiting for the loop: a stale
        read moves a refusal by one request, and `enter` still decides for those let through."""
        if self.max_queue is None or self.running < self.max_inflight:
            return None
        waiting = self.count.waiting_total()
        if waiting < self.max_queue:
            return None
        return QueueFull(self.max_queue, self.retry_after_s(waiting))

    def _remove(self, ticket: Ticket) -> None:
        line = self.lines[ticket.key]
        line.remove(ticket)
        if not line:
            del self.lines[ticket.key]
            self.rotation.remove(ticket.key)

    def _start(self, ticket: Ticket) -> None:
        self.running += 1
        ticket.running, ticket.position, ticket.started = True, None, time.monotonic()

    def _tell_places(self) -> None:
        for place, ticket in enumerate(self.order(), start=1):
            if ticket.position != place:
                ticket.position = place
                if ticket.on_position is not None:
                    ticket.on_position(place)
