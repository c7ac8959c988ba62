"""POST /api/predict of the web page (``cifake.demo``), within limits: the uploads of a
request are checked against a budget of decoded pixels before anything is decoded, each
file is read only when its turn comes, forward passes run one at a time, and requests go
through two lanes (small uploads, everything else) with their workers and queues, so a
flood of large uploads is refused (503) instead of piling up, and cannot hold up a small
one. When no upload is in progress, memory goes back to the system."""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

from data.errors import one_line
from data.images import MAX_FILE_BYTES, MAX_PIXELS
from .webguard import RETRY_AFTER_S, BodyTooLarge, Lane, MiB, content_length, json_safe, \
    release_memory, run_in_lane

MAX_UPLOAD_FILES = 64  # images per request


@dataclass
class WebLimits:
    """What one upload may cost and how many are worked on at once (the web command's
    flags). Uploads whose body is at most ``small_body`` bytes and whose images hold at
    most ``small_pixels`` pixels have a lane of their own, so a flood of large uploads
    cannot make a small one (or the page) wait."""
    max_body: int = 64 * MiB         # bytes of one request body, all its images together
    max_pixels: int = 50_000_000     # decoded pixels per request (one image: at most 40 Mpx)
    workers: int = 1                 # large uploads decoded and scored at once
    queue: int = 8                   # uploads that may wait for a worker, per lane
    small_body: int = MiB
    small_pixels: int = 1_000_000


@dataclass
class Upload:
    """One uploaded file: its name, the spooled file Starlette wrote, its size, and why it
    will not be decoded (None: it will be)."""
    name: str
    file: object
    size: int
    refusal: str | None = None
    deferred: bool = False           # refused only because this request's budget was spent


def declared_size(fileobj) -> tuple[int, int] | None:
    """The width and height an image file declares in its header (nothing is decoded);
    None when it is not an image Pillow can open (the decoder then says why)."""
    from PIL import Image
    try:
        fileobj.seek(0)
        with Image.open(fileobj) as im:  # (warnings.catch_warnings is not thread-safe)
            return im.size
    except Exception:  # unreadable, or a bomb refused from its header: the decoder reports it
        return None


def apply_budget(uploads: list[Upload], max_pixels: int) -> int:
    """Marks the files this request will not decode: over the size of any image file, or
    past the request's budget of decoded pixels (taken in order; a later, smaller file
    may still fit). Returns the pixels the request will decode."""
    used = 0
    for u in uploads:
        if u.size > MAX_FILE_BYTES:
            u.refusal = (f"{u.name}: {u.size:,} bytes, more than any image file should "
                         f"({MAX_FILE_BYTES:,})")
            continue
        wh = declared_size(u.file)
        if wh is None or wh[0] * wh[1] > MAX_PIXELS:  # the decoder refuses it from the header
            continue
        px = wh[0] * wh[1]
        if px > max_pixels:
            u.refusal = (f"{u.name}: {wh[0]}x{wh[1]} is {px / 1e6:.1f} Mpx, more than this "
                         f"page decodes per request ({max_pixels / 1e6:g} Mpx, "
                         f"--max-request-mpx)")
        elif used + px > max_pixels:
            u.refusal = (f"{u.name}: {wh[0]}x{wh[1]} ({px / 1e6:.1f} Mpx) is past this "
                         f"request's budget of {max_pixels / 1e6:g} Mpx of decoded pixels "
                         f"({used / 1e6:.1f} Mpx already); send it in another request")
            u.deferred = True
        else:
            used += px
    return used


def serialized(detector):
    """A shallow copy of ``detector`` whose forward passes run one at a time (the models
    are not re-entrant), while decoding, the slow part for large images, runs in the
    requests' own threads."""
    lock = threading.Lock()
    forward = detector.p_fake_batch
    copied = copy.copy(detector)

    def p_fake_batch(images):
        with lock:
            return forward(images)
    copied.p_fake_batch = p_fake_batch
    return copied


def score_uploads(detector, uploads: list[Upload], threshold: float) -> list[dict]:
    """Result records, one per upload, in order. Each file is read when its turn comes,
    so one request holds one file's bytes at a time, not all of them."""
    from core.predict import Unreadable

    def items():
        for u in uploads:
            if u.refusal is not None:
                yield Unreadable(u.name, u.refusal)
            else:
                u.file.seek(0)
                yield u.file.read(MAX_FILE_BYTES + 1)
    records = detector.predict(items(), threshold=threshold)
    for rec, u in zip(records, uploads):
        rec["path"] = u.name
        if rec["error"]:  # the decoder names inputs by position; the user knows names
            rec["error"] = rec["error"].replace(f"input {rec['index']}", u.name, 1)
        if u.deferred:
            rec["deferred"] = True
    return records


def error_response(status: int, message: str, **headers):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


PROMOTE = object()  # a small-lane upload whose images turned out large


class UploadJob:
    """One POST /api/predict: its form (spooled files) is read once, inside a lane, and
    closed when the request ends."""

    def __init__(self, request):
        self.request, self.form, self.uploads = request, None, None
        self.pixels = 0

    async def read(self, limits: WebLimits):
        """Parse the upload; a JSON error response when it is not one."""
        from starlette.concurrency import run_in_threadpool
        if self.uploads is not None:
            return None
        try:
            self.form = await self.request.form(max_files=MAX_UPLOAD_FILES, max_fields=8)
        except BodyTooLarge:
            raise
        except Exception as err:  # malformed multipart, too many files, client gone
            return error_response(400, f"bad upload ({getattr(err, 'detail', err)})")
        files = [f for f in self.form.getlist("images") if hasattr(f, "read")]
        if not files:
            return error_response(400, "no file in field 'images'")
        self.uploads = [Upload(one_line(f.filename or "upload"), f.file, f.size or 0)
                        for f in files]
        self.pixels = await run_in_threadpool(apply_budget, self.uploads, limits.max_pixels)
        return None

    async def drain(self) -> None:
        """Read and drop what is left of the body (``BodyLimit`` stops it at the limit),
        so that a refused client reads the answer instead of a reset connection."""
        try:
            async for _ in self.request.stream():
                pass
        except Exception:  # over the limit, disconnected, already consumed: nothing to read
            pass

    async def close(self) -> None:
        if self.form is not None:
            await self.form.close()
        self.form = self.uploads = None


class Scorer:
    """POST /api/predict within ``limits``: two lanes (small uploads, everything else),
    each with its workers and queue; files past the request's pixel budget refused by
    name; memory handed back to the system once no upload is in progress."""

    def __init__(self, detector, threshold: float, limits: WebLimits):
        self.detector, self.threshold, self.limits = serialized(detector), threshold, limits
        self.small = Lane("small", 1, limits.queue)
        self.large = Lane("large", limits.workers, limits.queue)
        self._large_since_release = False

    def idle(self) -> bool:
        return self.small.inside == 0 and self.large.inside == 0

    async def predict(self, request):
        from starlette.background import BackgroundTask
        job = UploadJob(request)
        try:
            response = await self._route(job)
        except BodyTooLarge as err:
            response = error_response(413, str(err))
        finally:
            await job.close()
        response.background = BackgroundTask(self._release_if_idle)
        return response

    async def _route(self, job: UploadJob):
        declared = content_length(job.request.scope)
        if declared is not None and declared <= self.limits.small_body:
            result = await run_in_lane(self.small, lambda: self._small(job))
            if result is None:
                return await self._busy(job, self.small)
            if result is not PROMOTE:
                return result
        self._large_since_release = True
        result = await run_in_lane(self.large, lambda: self._score(job))
        return await self._busy(job, self.large) if result is None else result

    async def _small(self, job: UploadJob):
        refused = await job.read(self.limits)
        if refused is not None:
            return refused
        return PROMOTE if job.pixels > self.limits.small_pixels else await self._score(job)

    async def _score(self, job: UploadJob):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse
        refused = await job.read(self.limits)
        if refused is not None:
            return refused
        records = await run_in_threadpool(score_uploads, self.detector, job.uploads,
                                          self.threshold)
        return JSONResponse(json_safe(records))

    async def _busy(self, job: UploadJob, lane: Lane):
        await job.drain()
        return error_response(503, lane.busy_message(), **{"Retry-After": str(RETRY_AFTER_S)})

    async def _release_if_idle(self) -> None:
        """After a large upload (small ones allocate little), once none is in progress."""
        from starlette.concurrency import run_in_threadpool
        if self.idle() and self._large_since_release:
            self._large_since_release = False
            await run_in_threadpool(release_memory)
