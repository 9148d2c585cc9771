"""Least-loaded dispatch of `flux_bls` requests over the GPUs of one server.

Triton hands a request to any `flux_bls` instance that is not inside `execute`. An `execute` that
returned at once (as a decoupled async one does) would make every instance look free, and requests
would go round-robin whatever each GPU already runs. So `flux_bls` runs its requests on its own
event loop and returns from `execute` only once its
GPU is among the least loaded: until then Triton sees the instance busy and gives the next request
to one on a less loaded GPU.

The instances are separate processes; each publishes its GPU, its active request count and how
many of those wait in its line (`flux_triton.admission`) in a small file of a folder private to
the server (`LoadBoard`), and reads the others'.
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

# pid, gpu (-1: CPU), active requests (running or waiting), waiting requests: four little-endian
# int64 per instance file
_ENTRY = struct.Struct("<qqqq")
_ACTIVE_OFFSET = 16
_WAITING_OFFSET = 24
_LOCK_FILE = ".queue.lock"  # held while a request joins the server's queue


def board_folder(server_pid: int) -> Path:
    """The folder the `flux_bls` instances of the server with this pid share (in memory when
    /dev/shm exists). It is named by the pid and the process's start time: a server restarted in
    a container that keeps its /dev/shm may get the same pid, never the same start."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    try:  # field 22 of /proc/<pid>/stat, after the parenthesised command name
        started = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    return base / f"flux-bls-load-{server_pid}-{started}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_entry(path: str) -> tuple[int, int, int, int] | None:
    """(pid, gpu, active, waiting) of an instance file; None while it is being written or once
    removed."""
    try:
        with open(path, "rb") as file:
            raw = file.read(_ENTRY.size)
    except FileNotFoundError:
        return None
    return _ENTRY.unpack(raw) if len(raw) == _ENTRY.size else None


class LoadBoard:
    """This instance's active request count, published for the server's other instances, and
    theirs, summed per GPU."""

    def __init__(self, folder: Path, instance: str, gpu: int | None):
        self.folder = folder
        self.gpu = -1 if gpu is None else gpu
        self.active = 0
        self.waiting = 0
        self.lock = threading.Lock()  # execute's thread adds, the event loop's thread subtracts
        self.path = folder / instance
        for attempt in range(3):  # the last instance of a stopping server may remove the folder
            folder.mkdir(parents=True, exist_ok=True)
            try:
                self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        os.pwrite(self.fd, _ENTRY.pack(os.getpid(), self.gpu, 0, 0), 0)
        for entry in os.scandir(folder):  # files left by crashed instances
            if entry.name == _LOCK_FILE:
                continue
            read = _read_entry(entry.path)
            if read is not None and not _alive(read[0]):
                Path(entry.path).unlink(missing_ok=True)

    def add(self, count: int) -> None:
        """Count `count` more (or, negative, fewer) active requests on this instance."""
        with self.lock:
            self.active += count
            if self.fd is not None:  # after close, a late request's end is only counted here
                # one aligned 8-byte write: readers never see a torn count
                os.pwrite(self.fd, struct.pack("<q", self.active), _ACTIVE_OFFSET)

    def join_queue(self, max_queue: int | None) -> bool:
        """Count one more request waiting here unless the server's queue already holds
        `max_queue` (None: no bound); whether it was counted. Atomic across the instances."""
        if max_queue is None:
            self._set_waiting(1)
            return True
        with open(self.folder / _LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if self.waiting_total() >= max_queue:
                return False
            self._set_waiting(1)
            return True

    def leave_queue(self) -> None:
        self._set_waiting(-1)

    def _set_waiting(self, change: int) -> None:
        with self.lock:
            self.waiting += change
            if self.fd is not None:
                os.pwrite(self.fd, struct.pack("<q", self.waiting), _WAITING_OFFSET)

    def _live_entries(self) -> list[tuple[int, int, int, int]]:
        """The other live instances' entries."""
        entries = []
        for entry in os.scandir(self.folder):
            if entry.name == _LOCK_FILE or entry.path == str(self.path):
                continue
            read = _read_entry(entry.path)
            if read is not None and _alive(read[0]):  # a crashed instance's requests are gone
                entries.append(read)
        return entries

    def waiting_total(self) -> int:
        """Requests waiting in line over the server's live instances (this one included)."""
        return self.waiting + sum(max(waiting, 0) for *_, waiting in self._live_entries())

    def loads_by_gpu(self) -> dict[int, int]:
        """Active requests per GPU over the live instances (this one included)."""
        loads = {self.gpu: self.active}  # this instance's own count, whatever its file says
        for _pid, gpu, active, _waiting in self._live_entries():
            loads[gpu] = loads.get(gpu, 0) + max(active, 0)
        return loads

    def least_loaded(self) -> bool:
        """Whether this instance's GPU runs no more requests than any other GPU of the server."""
        loads = self.loads_by_gpu()
        return loads[self.gpu] <= min(loads.values())

    def wait_until_least_loaded(self, poll_s: float = 0.005, timeout_s: float | None = None) -> bool:
        """Block until this GPU is among the least loaded or this instance serves no request
        (True), or `timeout_s` passed (False).

        The second condition bounds the wait by this instance's own requests whatever the others'
        files say. While one instance waits another is free (the least loaded one returned), so
        the poll interval delays no request.
        """
        began = time.monotonic()
        while self.active > 0 and not self.least_loaded():
            if timeout_s is not None and time.monotonic() - began >= timeout_s:
                return False
            time.sleep(poll_s)
        return True

    def close(self) -> None:
        """Withdraw this instance from the board."""
        with self.lock:
            if self.fd is None:
                return
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)
        try:
            if not self._live_entries():  # the last one out: crashed instances' files, the lock
                for entry in os.scandir(self.folder):
                    Path(entry.path).unlink(missing_ok=True)
        except OSError:
            pass
        try:
            self.folder.rmdir()  # the last instance out removes the folder
        except OSError:
            pass
