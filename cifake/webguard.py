"""What keeps the web page's work bounded and its answers to itself (``cifake.demo``).

- ``HostCheck``: the page answers only requests naming its own address in the Host
  header, so a web site whose name resolves to 127.0.0.1 (DNS rebinding) cannot read it.
- ``BodyLimit``: a request body larger than the limit is refused (413) from its
  Content-Length before any of it is read, or as soon as the streamed bytes pass it.
- ``Lane``: requests of one kind in progress and waiting; the rest are told to come back
  later (503 with Retry-After) instead of piling up in memory.
- ``release_memory``: after a burst, garbage and the C allocator's free pages go back to
  the system (glibc keeps freed heap pages otherwise).
- ``json_safe``: NaN and infinities become null, so every JSON answer is valid JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import ipaddress
import json
import math
import socket
import threading

MiB = 2**20
RETRY_AFTER_S = 5
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")


# ------------------------------------------------------------------ responses
async def send_response(send, status: int, body: bytes, content_type: bytes,
                        headers: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def send_error_json(send, status: int, message: str, headers: tuple = ()) -> None:
    """``{"error": message}``: what the page's script shows for a failed upload."""
    await send_response(send, status, json.dumps({"error": message}).encode(),
                        b"application/json", headers)


def json_safe(obj):
    """``obj`` with every NaN or infinity replaced by None (JSON has no such numbers), dict
    keys made strings, tuples made lists: what strict JSON (``allow_nan=False``) accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


# ------------------------------------------------------------------ hosts
def url_host(host: str) -> str:
    """An address as it stands in a URL: IPv6 in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "[::1]"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def network_names() -> list[str]:
    """Names and the address under which other machines may reach this one: the address
    of the default route (a UDP socket is connected, nothing is sent) and the host name."""
    names = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                addr = s.getsockname()[0]
        except OSError:
            continue
        if not is_loopback(addr):
            names.append(url_host(addr))
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name.lower() not in (n.lower() for n in names):
            names.append(name)
    return names


def host_name(value: str) -> str | None:
    """The name in a Host header ('name', 'name:port', '[v6]' or '[v6]:port'), lowercased,
    without a trailing dot; None when the header is malformed."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 address
        inside, bracket, rest = value[1:].partition("]")
        name = f"[{inside}]"
        if not bracket:
            return None
    else:
        name = value.partition(":")[0]
        rest = value[len(name):]
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return name.rstrip(".")


class HostCheck:
    """Answers only requests whose Host header names one of ``names`` (any port: an SSH
    tunnel may forward another one; the name is what a rebinding site cannot fake);
    anything else gets 400 and one line naming ``url``, the page's address."""

    def __init__(self, app, names, url: str):
        self.app, self.url = app, url
        self.names = {url_host(n).lower().rstrip(".") for n in names}

    def allows(self, value: str | None) -> bool:
        return host_name(value or "") in self.names

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        value = _header(scope, b"host")
        if self.allows(value):
            return await self.app(scope, receive, send)
        shown = "no Host header" if value is None else f"the Host header {value[:100]!r}"
        text = (f"error: this page answers only at its own address ({self.url}); the request "
                f"had {shown}\n")
        if scope["type"] == "http":
            await send_response(send, 400, text.encode(), b"text/plain; charset=utf-8")
        else:
            await send({"type": "websocket.close", "code": 1008})


# ------------------------------------------------------------------ request bodies
class BodyTooLarge(Exception):
    """A request body passed the limit while it streamed in; the message says so."""


def too_large_message(limit: int, size: int | None) -> str:
    seen = f"{size:,} bytes ({size / MiB:.1f} MiB)" if size is not None \
        else f"more than {limit:,} bytes"
    return (f"the upload is {seen}; this page accepts at most {limit:,} bytes "
            f"({limit / MiB:g} MiB) per request (--max-request-mb): send fewer or smaller "
            f"images at once")


def content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class BodyLimit:
    """Refuses (413) a body over ``limit`` bytes: from its Content-Length before reading
    any of it, else as soon as the bytes received pass the limit (the app's ``receive``
    raises ``BodyTooLarge``; an app may answer that itself, otherwise this does)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = content_length(scope)
        if declared is not None and declared > self.limit:
            return await send_error_json(send, 413, too_large_message(self.limit, declared))
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(too_large_message(self.limit, declared))
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as err:
            if started:
                raise
            await send_error_json(send, 413, str(err))


# ------------------------------------------------------------------ admission
class Lane:
    """Requests of one kind: at most ``workers`` in progress and ``queue`` more waiting for
    one of them; ``admit`` refuses the rest. Used from the event loop only."""

    def __init__(self, name: str, workers: int, queue: int):
        self.name, self.workers, self.queue = name, workers, queue
        self.inside = 0  # admitted and not yet finished: in progress + waiting
        self._slots: asyncio.Semaphore | None = None

    @property
    def waiting(self) -> int:
        return max(0, self.inside - self.workers)

    def admit(self) -> bool:
        if self.inside >= self.workers + self.queue:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._slots is None:  # created in the loop that serves the app
            self._slots = asyncio.Semaphore(self.workers)
        async with self._slots:
            yield

    def busy_message(self) -> str:
        return (f"the page is busy: {self.inside} upload(s) of this kind are being scored or "
                f"waiting (--workers {self.workers}, --queue {self.queue}); try again in "
                f"{RETRY_AFTER_S} s")


async def run_in_lane(lane: Lane, job):
    """``await job()`` once ``lane`` has a worker free; None if its queue is full."""
    if not lane.admit():
        return None
    try:
        async with lane.slot():
            return await job()
    finally:
        lane.leave()


# ------------------------------------------------------------------ memory
_trim_lock = threading.Lock()


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Collect garbage, then hand the C heap's free pages back to the system (glibc's
    ``malloc_trim``; elsewhere only the collection). Called when no upload is in progress."""
    if not _trim_lock.acquire(blocking=False):
        return  # another thread is at it
    try:
        gc.collect()
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
    finally:
        _trim_lock.release()
