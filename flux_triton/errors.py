"""The error protocol, declared once: how a failure's status code, an out-of-memory and an
invalid field travel in an error message, and what a client makes of one.

Triton 2.51 hands a BLS caller every error response with the code INTERNAL, whatever the called
model set (triton-inference-server/server#7804), so every error this project raises carries its
code in its text too (`[UNAVAILABLE] ...`), and Triton's own errors about a model that cannot
serve right now are known by their words. stdlib only: the components, the BLS, the gateway and
the load client all read errors through this module.
"""

from __future__ import annotations

import re

# Triton status codes by name, as `TritonError` spells them.
STATUS_CODES = ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED",
                "ALREADY_EXISTS", "CANCELLED")
# Codes Triton's Python backend cannot set: they travel as a tag on a code it has (`tag_status`).
# RESOURCE_EXHAUSTED: the server's queue is full (MAX_QUEUE), sent on UNAVAILABLE.
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
TAG_CODES = (*STATUS_CODES, RESOURCE_EXHAUSTED)
_STATUS_TAG = re.compile(rf"\[({'|'.join(TAG_CODES)})\] ")
# How long a refused client should wait, in a refusal's text (`retry_after_text`).
_RETRY_AFTER = re.compile(r"retry after (\d+) s\b")
# Triton's own words for a model that cannot serve right now (loading, unloading, its process
# being restarted): transient, like UNAVAILABLE.
TRITON_UNAVAILABLE_MARKERS = ("is not ready", "is not healthy", "unavailable", "has no available versions")
# Triton has no status code for out-of-memory: a component reports it as INTERNAL with this text.
OUT_OF_MEMORY_MARKER = "out of memory"
OOM_MARKERS = (OUT_OF_MEMORY_MARKER, "outofmemory", "out_of_memory", "can't allocate memory")
_FIELD = re.compile(r"`(\w+)`: ")


def tag_status(status: str, message: str) -> str:
    """`message` with its status code spelled in it, so it survives a BLS hop."""
    if status not in TAG_CODES:
        raise ValueError(f"status must be one of {TAG_CODES}, got {status!r}")
    return f"[{status}] {message}"


def retry_after_text(seconds: int) -> str:
    """The part of a refusal that says when to try again (read back by `retry_after_s`)."""
    return f"retry after {int(seconds)} s"


def retry_after_s(message: str) -> int | None:
    found = _RETRY_AFTER.search(message)
    return int(found.group(1)) if found else None


def reported_status(code: str | None, message: str) -> str | None:
    """The status a failed call reports: its code where it says more than INTERNAL, else the tag
    in its message, else (INTERNAL and untagged) UNAVAILABLE for Triton's own not-ready errors.
    None when neither a code nor a tag is there."""
    if code not in (None, "UNKNOWN", "INTERNAL"):
        return code
    tag = _STATUS_TAG.search(message)
    if tag:
        return tag.group(1)
    if code == "INTERNAL":
        lowered = message.lower()
        return "UNAVAILABLE" if any(m in lowered for m in TRITON_UNAVAILABLE_MARKERS) else "INTERNAL"
    return None


def mentions_out_of_memory(message: str) -> bool:
    return any(marker in message.lower() for marker in OOM_MARKERS)


def field_message(field: str, message: str) -> str:
    """An invalid-input message naming the request field it is about."""
    return f"`{field}`: {message}"


def named_field(message: str) -> str | None:
    """The request field an error message names first (see `field_message`), if any."""
    found = _FIELD.search(message)
    return found.group(1) if found else None


def client_error_kind(message: str) -> str:
    """What an error a client received means: `invalid_argument` (fix the request),
    `resource_exhausted` (the queue is full: try again after the time it says), `unavailable`
    (try again later), `cancelled`, `timeout` (a transport deadline) or `failed`."""
    status = reported_status(None, message)
    if status == "INVALID_ARG":
        return "invalid_argument"
    if status == RESOURCE_EXHAUSTED:
        return "resource_exhausted"
    if status == "CANCELLED":
        return "cancelled"
    lowered = message.lower()
    if status == "UNAVAILABLE" or any(m in lowered for m in TRITON_UNAVAILABLE_MARKERS) or \
            "socket closed" in lowered or "failed to connect" in lowered:
        return "unavailable"
    if "deadline exceeded" in lowered:
        return "timeout"
    return "failed"
