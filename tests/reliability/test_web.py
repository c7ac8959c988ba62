"""The web page (``cifake.demo``) under floods, foreign hosts and damaged run files.

Most cases call the ASGI app in-process (a scripted ``receive`` counts the body bytes the
app pulls, so "refused before it is stored" is checked exactly); the load test serves the
app with uvicorn in a thread and talks raw HTTP to it over sockets, with small limits so
that it takes a few seconds. Nothing here times a request against a tight bound: a
request that must not wait is checked to complete while the large uploads' workers are
all held, which is true or false whatever the machine's load.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import io
import json
import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest
from PIL import Image

from data.errors import UserError
from tests.helpers import cmd, env, make_archive, mlp_run, require_modules, skip_or_fail

MiB = 2**20
BOUNDARY = "cifake-test-boundary"


@pytest.fixture(autouse=True)
def _demo_extra():
    require_modules("starlette", "uvicorn", "multipart", extra="demo")


@pytest.fixture
def run_dir(tmp_path):
    return mlp_run(tmp_path / "run")


def detector_of(run_dir):
    from numpy_mlp.predict import Detector
    return Detector.load(run_dir)


def make_app(run_dir, **limits):
    """The page's app for ``run_dir``, with ``limits`` (WebLimits fields) when given."""
    from cifake.demo import build_app
    if not limits:
        return build_app(detector_of(run_dir), 0.5, None)
    from cifake.webscore import WebLimits
    return build_app(detector_of(run_dir), 0.5, None, limits=WebLimits(**limits))


def png(width: int, height: int, color=(20, 200, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; '
             f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
             + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


FORM = (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())


# ------------------------------------------------------------------ in-process ASGI calls
class Call:
    """One in-process request. ``chunks`` is the body as it streams in (an iterable of
    bytes; a generator can be endless); ``pulled`` counts the body bytes the app read."""

    def __init__(self, method="GET", path="/", chunks=(), headers=(), host="127.0.0.1:8000"):
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                      "method": method, "scheme": "http", "path": path,
                      "raw_path": path.encode(), "query_string": b"", "root_path": "",
                      "headers": [(b"host", host.encode()), *headers],
                      "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
        self.chunks, self.pulled, self.ended = iter(chunks), 0, False
        self.status, self.headers, self.body, self.crashed = None, {}, b"", None

    async def receive(self):
        chunk = None if self.ended else next(self.chunks, None)
        if chunk is not None:
            self.pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": True}
        if not self.ended:
            self.ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(30)  # a real client keeps the connection until the answer
        return {"type": "http.disconnect"}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def __call__(self, app):
        try:
            await app(self.scope, self.receive, self.send)
        except Exception as err:  # what a server would turn into HTTP 500
            self.crashed = f"{type(err).__name__}: {err}"
            self.status = self.status or 500
        return self

    def json(self):
        return json.loads(self.body, parse_constant=_no_constants)


def _no_constants(name):
    raise AssertionError(f"not strict JSON: {name}")


def call(app, *a, **kw) -> Call:
    return asyncio.run(asyncio.wait_for(Call(*a, **kw)(app), 60))


def upload(app, files, **kw) -> Call:
    body = multipart(files)
    headers = [FORM, (b"content-length", str(len(body)).encode())]
    return call(app, "POST", "/api/predict", [body], headers, **kw)


# ------------------------------------------------------------------ 1. bounded work
def test_an_upload_over_the_limit_is_refused_from_its_declared_size_before_it_is_read(run_dir):
    app = make_app(run_dir)  # the default limit: 64 MiB per request
    size = 1_610_612_736  # 1.5 GiB declared; the client would stream it
    r = call(app, "POST", "/api/predict", (b"x" * MiB for _ in range(4)),
             [FORM, (b"content-length", str(size).encode())])
    assert r.status == 413, (r.status, r.body[:300], r.crashed)
    assert r.pulled == 0, f"{r.pulled} body bytes read before refusing"
    message = r.json()["error"]
    assert "\n" not in message and "1,610,612,736" in message and "67,108,864" in message, \
        message


def test_a_streamed_body_is_cut_off_as_soon_as_it_passes_the_limit(run_dir):
    app = make_app(run_dir, max_body=MiB)
    head = multipart([("big.png", b"")])[:-len(f"\r\n--{BOUNDARY}--\r\n")]
    stream = (head if i == 0 else os.urandom(64 * 1024) for i in range(129))  # 8 MiB
    r = call(app, "POST", "/api/predict", stream, [FORM])  # no Content-Length: chunked
    assert r.status == 413, (r.status, r.body[:300], r.crashed)
    assert r.pulled <= MiB + 64 * 1024 + len(head), f"{r.pulled:,} bytes read"
    message = r.json()["error"]
    assert "1,048,576" in message and "--max-request-mb" in message, message


def test_a_file_over_the_image_size_limit_is_named_with_its_real_size(run_dir):
    from data.images import MAX_FILE_BYTES
    app = make_app(run_dir, max_body=MAX_FILE_BYTES + 2 * MiB)
    big = b"\0" * (MAX_FILE_BYTES + 12_345)
    r = upload(app, [("small.png", png(32, 32)), ("huge.raw", big)])
    assert r.status == 200, (r.status, r.body[:300], r.crashed)
    ok, huge = r.json()
    assert ok["error"] is None and ok["p_fake"] is not None
    assert huge["error"].startswith("huge.raw: ") and f"{len(big):,} bytes" in huge["error"], \
        huge["error"]


def test_decoding_is_bounded_by_a_pixel_budget_per_request_naming_each_file(run_dir):
    app = make_app(run_dir, max_pixels=10_000_000)
    four = png(2000, 2000)  # 4 Mpx each, a few KB of PNG
    r = upload(app, [("a.png", four), ("b.png", four), ("c.png", four),
                     ("tiny.png", png(32, 32)), ("huge.png", png(4000, 3000))])
    assert r.status == 200, (r.status, r.body[:300], r.crashed)
    recs = {rec["path"]: rec for rec in r.json()}
    assert recs["a.png"]["error"] is None and recs["b.png"]["error"] is None
    assert recs["tiny.png"]["error"] is None  # a later, smaller file still fits
    c, huge = recs["c.png"]["error"], recs["huge.png"]["error"]
    assert c.startswith("c.png: 2000x2000") and "budget of 10 Mpx" in c, c
    assert recs["c.png"]["deferred"] is True  # the page sends it again in its next upload
    assert huge.startswith("huge.png: 4000x3000") and "--max-request-mpx" in huge, huge
    assert "deferred" not in recs["huge.png"]  # it never fits: not worth sending again


def test_memory_is_handed_back_to_the_system_after_a_burst():
    from cifake.webguard import release_memory
    if ctypes.util.find_library("c") is None or not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("not glibc: no malloc_trim")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    held = []

    def burst():  # 160 MiB of heap blocks in a worker thread (its own malloc arena)
        blocks = [bytearray(4000) for _ in range(40_000)]
        held.extend(blocks[::64])  # a few survivors pin the heap: glibc keeps the rest
    t = threading.Thread(target=burst)
    t.start()
    t.join()
    before = rss()
    release_memory()
    after = rss()
    assert before - after > 50 * MiB, f"RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB"


# ------------------------------------------------------------------ 2. its own host only
@pytest.mark.parametrize("host,allowed", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True),
    ("LOCALHOST", True), ("evil.example", False), ("evil.example:8000", False),
    ("127.0.0.1.evil.example:8000", False), ("", False)])
def test_the_page_answers_only_its_own_host(run_dir, host, allowed):
    app = make_app(run_dir)
    r = call(app, "GET", "/api/run", host=host)
    if allowed:
        assert r.status == 200 and r.json()["config"]["model"] == "mlp2", (r.status, r.body)
        return
    assert r.status == 400, (r.status, r.body[:300])
    text = r.body.decode()
    assert text.count("\n") <= 1 and text.startswith("error:"), text
    assert str(run_dir) not in text and "mlp2" not in text


@pytest.mark.parametrize("host,bound,url,warns", [
    ("127.0.0.1", "127.0.0.1", "http://127.0.0.1:8000/", False),
    ("localhost", "127.0.0.1", "http://localhost:8000/", False),
    ("::1", "::1", "http://[::1]:8000/", False),
    ("0.0.0.0", "0.0.0.0", "http://127.0.0.1:8000/", True),
    ("::", "::", "http://[::1]:8000/", True),
    ("192.0.2.7", "192.0.2.7", "http://192.0.2.7:8000/", True)])
def test_start_up_prints_a_correct_url_and_warns_beyond_the_loopback(host, bound, url, warns):
    from cifake.demo import addresses
    shown, names, warning = addresses(host, bound, 8000, ["box.lan"])
    assert shown == url
    assert {"127.0.0.1", "localhost", "[::1]", "box.lan"} <= set(names)
    if warns:
        assert "no authentication" in warning and "anyone" in warning, warning
    else:
        assert warning == ""


def test_listening_on_every_interface_says_so_and_still_refuses_foreign_hosts(run_dir):
    p = subprocess.Popen(cmd("cifake.demo", "--run", run_dir, "--host", "0.0.0.0",
                             "--port", "0"), env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        first = readline(p.stdout)
        assert first.startswith("CIFAKE detector page: http://127.0.0.1:"), \
            (first, p.stderr.read() if p.poll() is not None else "")
        port = int(first.split()[3].rsplit(":", 1)[1].strip("/"))
        warning = readline(p.stderr, 20)
        assert warning.startswith("warning:") and "no authentication" in warning, warning
        assert "anyone" in warning and f"port {port}" in warning, warning
        assert raw_request(port, b"GET /api/run HTTP/1.1\r\nHost: evil.example\r\n\r\n")[0] \
            == 400
        status, _, body = raw_request(port, f"GET /api/run HTTP/1.1\r\nHost: 127.0.0.1:"
                                            f"{port}\r\n\r\n".encode())
        assert status == 200 and json.loads(body)["stack"] == "numpy_mlp"
    finally:
        p.terminate()
        p.wait(20)


def readline(stream, timeout: float = 60) -> str:
    """The next line of a child's output; '' if none comes within ``timeout`` seconds."""
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return line[0] if line else ""


# ------------------------------------------------------------------ 3. damaged run files
NAN = float("nan")
BAD_METRICS = {
    "epochs_are_strings": {"history": [{"epoch": "1", "train_acc": 50.0},
                                       {"epoch": "2", "train_acc": 60.0}]},
    "epochs_are_null": {"history": [{"epoch": None, "test_acc": 50.0},
                                    {"epoch": None, "test_acc": 55.0}]},
    "history_is_a_string": {"history": "1,2,3"},
    "history_is_null": {"history": None},
    "history_is_an_object": {"history": {"epoch": 1}},
    "history_holds_non_objects": {"history": [3, "x", None, {"epoch": 1, "train_acc": 5.0}]},
    "values_are_nan_and_inf": {"history": [{"epoch": 1, "train_acc": NAN, "test_loss": 0.7},
                                           {"epoch": 2, "train_acc": float("inf"),
                                            "test_loss": -float("inf")},
                                           {"epoch": NAN, "train_acc": 60.0}],
                               "final": {"test_acc": NAN, "roc_auc": float("inf")}},
    "final_is_a_list": {"history": [], "final": [1, 2]},
}


@pytest.mark.parametrize("case", sorted(BAD_METRICS))
def test_a_damaged_metrics_json_gives_a_note_never_a_500(run_dir, case):
    (run_dir / "metrics.json").write_text(json.dumps(BAD_METRICS[case]))  # NaN as Python writes it
    app = make_app(run_dir)
    page = call(app, "GET", "/")
    assert page.status == 200, (page.status, page.crashed)
    text = page.body.decode()
    assert "Traceback" not in text and "nan," not in text and ",nan" not in text
    if case != "history_is_null":
        assert 'class="note"' in text and "metrics.json" in text, text[:2000]
    info = call(app, "GET", "/api/run")
    assert info.status == 200, (info.status, info.crashed)
    info.json()  # strict JSON: NaN and infinities are null


def test_api_run_writes_non_finite_config_and_metrics_values_as_null(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**cfg, "lr": NAN}))
    (run_dir / "metrics.json").write_text(json.dumps(BAD_METRICS["values_are_nan_and_inf"]))
    info = call(make_app(run_dir), "GET", "/api/run")
    assert info.status == 200, (info.status, info.crashed)
    doc = info.json()
    assert doc["config"]["lr"] is None and doc["metrics"]["final"]["roc_auc"] is None
    assert doc["metrics"]["history"][0]["test_loss"] == 0.7


# ------------------------------------------------------------------ the load test
def raw_request(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before an answer: {buf[:200]!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def post_head(port: int, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"multipart/form-data; boundary={BOUNDARY}\r\n{size}\r\n\r\n").encode()


@contextmanager
def served(app):
    """``app`` served by uvicorn in a thread on a free loopback port."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        t.join(20)
        sock.close()


def wait_until(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class RssPeak:
    """The largest resident set of this process (the server runs in it) while active."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_queue_refusals_small_uploads_and_memory_stay_bounded(run_dir):
    app = make_app(run_dir, max_body=MiB, workers=1, queue=1, small_body=64 * 1024)
    large = app.state.scorer.large
    tiny = multipart([("tiny.png", png(32, 32))])
    padded = multipart([("a.png", png(32, 32)), ("pad.bin", os.urandom(300_000))])
    with served(app) as port:
        # two large uploads that send their headers and a little of their body, then stall:
        # one holds the only worker, one waits in the queue
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        for s in stalled:
            s.sendall(post_head(port, len(padded)) + padded[:1000])
            time.sleep(0.05)
        wait_until(lambda: large.inside == 2, "two large uploads admitted")
        # a third is refused at once, told when to come back
        status, headers, body = raw_request(port, post_head(port, len(padded)) + padded)
        assert status == 503 and headers.get("retry-after", "").isdigit(), (status, body)
        assert "--workers 1" in json.loads(body)["error"]
        # over the limit: refused from the headers alone, no body sent at all
        status, _, body = raw_request(port, post_head(port, 5 * MiB))
        assert status == 413 and "5,242,880" in json.loads(body)["error"], body
        # a small upload and the page itself are answered while the large lane is full
        t0 = time.monotonic()
        status, _, body = raw_request(port, post_head(port, len(tiny)) + tiny)
        assert status == 200 and json.loads(body)[0]["p_fake"] is not None, body
        status, _, page = raw_request(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                            f"\r\n".encode())
        assert status == 200 and b"CIFAKE detector" in page
        assert time.monotonic() - t0 < 15  # generous: they did not wait for the stalled two
        assert large.inside == 2  # the stalled uploads still hold the large lane
        for s in stalled:
            s.sendall(padded[1000:])
        for s in stalled:
            status, _, body = read_response(s)
            recs = json.loads(body)
            assert status == 200 and recs[0]["p_fake"] is not None and recs[1]["error"], body
            s.close()
        wait_until(lambda: large.inside == 0, "the lane to empty")
        flood_rss = flood(port)
    assert flood_rss < 200 * MiB, f"RSS grew by {flood_rss / MiB:.0f} MiB during the flood"


def flood(port: int, clients: int = 8) -> int:
    """``clients`` uploads of two 1500x1500 images (4.5 Mpx to decode) and 600 KB of
    padding, all at once; returns how much the resident set grew at its peak."""
    big = multipart([("a.png", png(1500, 1500)), ("b.png", png(1500, 1500, (9, 9, 9))),
                     ("pad.bin", os.urandom(600_000))])
    statuses = []

    def one():
        statuses.append(raw_request(port, post_head(port, len(big)) + big, timeout=60)[0])
    with RssPeak() as rss:
        threads = [threading.Thread(target=one) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(statuses) == clients and set(statuses) <= {200, 503}, statuses
    assert 200 in statuses, statuses
    return rss.peak - rss.start


def test_the_page_splits_a_drop_into_uploads_within_the_limits(run_dir, tmp_path):
    """In a real browser: a file over --max-request-mb is refused on the page without being
    sent, and images past an upload's pixel budget are sent again in the next upload."""
    from tests.e2e.test_demo import chromium_path
    exe = chromium_path()
    if exe is None:
        skip_or_fail("no Chromium (apt-get install chromium, or set CIFAKE_CHROMIUM)")
    require_modules("playwright", extra="test")
    from playwright.sync_api import sync_playwright
    files = {"a.png": png(2000, 2000), "b.png": png(2000, 2000, (200, 10, 10)),
             "big.png": os.urandom(int(1.5 * MiB)), "t.png": png(32, 32)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    p = subprocess.Popen(cmd("cifake.demo", "--run", run_dir, "--port", "0",
                             "--max-request-mb", "1", "--max-request-mpx", "5"),
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = readline(p.stdout).split()[3]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True)
            page = browser.new_page()
            page.set_default_timeout(30_000)
            posts = []
            page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
            page.goto(url)
            page.set_input_files("#files", [str(tmp_path / n) for n in files])
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".startsWith('scored')")
            rows = {r.get_attribute("data-name"): r for r in page.locator("tr.result").all()}
            assert sorted(rows) == sorted(files)
            for name in ("a.png", "b.png", "t.png"):
                assert rows[name].get_attribute("data-p-fake") is not None, name
            assert "--max-request-mb" in rows["big.png"].get_attribute("data-error")
            # [a, b] (b past the budget), [b] (big.png would pass 1 MiB), big.png refused
            # on the page, [t]
            assert len(posts) == 3, [q.url for q in posts]
            browser.close()
    finally:
        p.terminate()
        p.wait(20)


def test_the_page_shows_the_battery_when_the_run_has_it_and_a_note_when_it_is_damaged(
        run_dir, tmp_path):
    from cifake import battery
    never = call(make_app(run_dir), "GET", "/").body.decode()
    assert "not been measured" in never and "cifake.battery" in never
    archive = make_archive(tmp_path / "tiny.zip", n_train=2, n_test=4)
    assert battery.main(["--run", str(run_dir), "--data", str(archive), "--cache-dir",
                         str(tmp_path / "cache"), "--workers", "1"]) == 0
    shown = call(make_app(run_dir), "GET", "/")
    assert shown.status == 200 and "JPEG quality 50" in shown.body.decode()
    (run_dir / "battery.json").write_text("[1, 2")
    damaged = call(make_app(run_dir), "GET", "/")
    assert damaged.status == 200, (damaged.status, damaged.crashed)
    text = damaged.body.decode()
    assert 'class="note"' in text and "battery.json" in text and "Traceback" not in text


def test_a_wrongly_shaped_realworld_json_is_refused_at_start_with_one_line(run_dir):
    from cifake.demo import realworld_html
    bad = run_dir / "realworld.json"
    bad.write_text(json.dumps({"rows": [{"key": "a", "chosen": True, "n": "16"}]}))
    with pytest.raises(UserError, match="realworld.json"):
        realworld_html(bad, run_dir)
