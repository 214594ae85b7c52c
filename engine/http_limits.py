"""Bounded HTTP reads for ``msdda serve``: what a slow, stalled or oversized client may cost.

Ray Serve's proxy (uvicorn) hands each request to the replica as soon as its headers arrive and streams the body
after it, so a client that sends headers and then stalls would hold one of the replica's request slots for as
long as it likes. Here:

- a body is read with a deadline (``body_timeout_s``): a client that has not sent it whole by then gets 408;
- a body above ``max_body_bytes`` gets 413, from its Content-Length before anything is read, or as soon as the
  streamed bytes pass the limit, never parsed;
- the replica accepts ``max_connections`` requests beyond the room its batching needs, so stalled bodies cannot
  take every slot from ``/healthz`` and small generates; Ray Serve's proxy queues at most ``max_queued``
  more and answers 503 beyond that (so the total is bounded, not the service);
- prompts above ``max_prompt_chars`` characters are refused (422) before any tokenizer sees them: the text
  encoder reads only its first 77 tokens (diffusers truncates there), so a longer prompt only costs time.

uvicorn's own keep-alive timeout (``keep_alive_timeout_s``) closes idle connections between requests.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["HttpLimits", "HttpError", "read_body", "check_prompt_lengths", "add_http_args", "http_limits_from_args"]


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 1 << 20       # 1 MiB: a generate request is a few hundred bytes
    body_timeout_s: float = 10.0
    max_connections: int = 256          # requests a replica holds beyond its batching room
    max_queued: int = 1024              # requests Ray Serve's proxy queues for a replica (then 503)
    max_prompt_chars: int = 4096        # far above what 77 CLIP tokens can cover
    keep_alive_timeout_s: int = 5


class HttpError(Exception):
    """A request refused at the HTTP layer: ``status`` (408, 413) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request, limits: HttpLimits) -> bytes:
    """The body of a Starlette ``request``, at most ``limits.max_body_bytes``, read within
    ``limits.body_timeout_s``; HttpError(413 / 408) otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if size > limits.max_body_bytes:
            raise HttpError(413, f"request body of {size} bytes is above the limit of {limits.max_body_bytes} bytes")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise HttpError(413, f"request body is above the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise HttpError(408, f"request body not received within {limits.body_timeout_s:g} s") from None


def check_prompt_lengths(call: dict, max_chars: int) -> None:
    """ValueError when a prompt or negative prompt is longer than ``max_chars`` characters."""
    for name in ("prompt", "negative_prompt"):
        value = call.get(name)
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str) and len(text) > max_chars:
                raise ValueError(f"{name} is {len(text)} characters, more than the {max_chars} this server takes "
                                 "(the text encoder reads only its first 77 tokens)")


def add_http_args(g) -> None:
    """``msdda serve``'s HTTP limits."""
    d = HttpLimits()
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body; larger ones get 413 before parsing (default {d.max_body_bytes})")
    g.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help=f"time a client has to send its request body, else 408 (default {d.body_timeout_s:g})")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="requests a replica holds beyond its batching room, so slow clients cannot take every slot "
                        f"(default {d.max_connections})")
    g.add_argument("--max-queued", type=int, default=d.max_queued,
                   help=f"requests the proxy queues per replica beyond those; then 503 (default {d.max_queued})")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"longest prompt accepted, in characters (default {d.max_prompt_chars})")
    g.add_argument("--keep-alive-timeout-s", type=int, default=d.keep_alive_timeout_s,
                   help=f"idle keep-alive connections are closed after this (default {d.keep_alive_timeout_s})")


def http_limits_from_args(args) -> HttpLimits:
    """The HTTP limits the flags give; a flag that is not positive is a one-line ValueError."""
    import math

    values = {name: getattr(args, name) for name in HttpLimits.__dataclass_fields__}
    for name, value in values.items():
        if value is None or not math.isfinite(value) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return HttpLimits(**values)
