"""Load on the web page (``cifake.demo``), measured by hand; not part of the test suite.

Starts ``python -m cifake.demo`` from a source tree (``--tree``, default this checkout) on
a free port, floods it with large uploads from several clients at once, and meanwhile
sends a 32x32 image and loads the page every half second. Prints the server's resident
memory (before, peak, and after the flood once it has settled) and the latency of those
small requests. Run it on two trees (e.g. a checkout of an older commit) to compare:

    python scripts/web_load.py --scenario bodies     # 4 clients x 16 random files of 16 MB
    python scripts/web_load.py --scenario bodies --file-mb 4   # within the 64 MiB limit
    python scripts/web_load.py --scenario pixels     # 2 clients x 16 copies of a 6000x6000 PNG
    python scripts/web_load.py --tree ../other-checkout --scenario pixels

Without ``--run`` it scores with a tiny untrained NumPy MLP written to a temporary folder
(the page's own work is what is measured, not the model's).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "cifake-load-boundary"


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; '
             f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
             + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def png(width: int, height: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 160, 90)).save(buf, "PNG")
    return buf.getvalue()


def read_response(s: socket.socket, pending: bytearray) -> int:
    """The status of the next response on ``s`` (an interim 100 Continue included);
    ``pending`` keeps bytes received past it."""
    while b"\r\n\r\n" not in pending:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before an answer")
        pending += chunk
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    pending[:] = rest
    status = int(head.split()[1])
    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")[1:]
                   if h.lower().startswith(b"content-length:")), 0)
    while len(pending) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        pending += chunk
    del pending[:length]
    return status


def post(port: int, body: bytes, timeout: float = 600) -> str:
    """POST /api/predict as curl does for a large body (Expect: 100-continue, or the body
    after a second without an answer): a server that refuses from the headers never
    receives the body. Returns the final status, or what went wrong."""
    head = (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()
    pending = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(head)
            s.settimeout(1.0)
            try:
                status = read_response(s, pending)
            except socket.timeout:
                status = 100
            s.settimeout(timeout)
            if status != 100:
                return str(status)
            s.sendall(body)
            while status == 100:
                status = read_response(s, pending)
            return str(status)
    except OSError as err:
        return type(err).__name__


def get_page(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return str(read_response(s, bytearray()))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Watch(threading.Thread):
    """Samples the server's RSS every 20 ms (the peak), and every 0.5 s times a 32x32
    upload and a page load."""

    def __init__(self, pid: int, port: int):
        super().__init__(daemon=True)
        self.pid, self.port, self.stop = pid, port, threading.Event()
        self.peak, self.small, self.page, self.statuses = rss(pid), [], [], []
        self.tiny = multipart([("tiny.png", png(32, 32))])

    def run(self):
        prober = threading.Thread(target=self.probe, daemon=True)
        prober.start()
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))
        prober.join()

    def probe(self):
        while not self.stop.wait(0.5):
            t = time.monotonic()
            self.statuses.append(post(self.port, self.tiny))
            self.small.append(time.monotonic() - t)
            t = time.monotonic()
            get_page(self.port)
            self.page.append(time.monotonic() - t)


def scenario(args) -> tuple[int, bytes]:
    """(clients, the body each sends at once)."""
    if args.scenario == "bodies":  # random bytes: refused by the decoder, but held until then
        blob = os.urandom(int(args.file_mb * 10**6))
        return args.clients or 4, multipart([(f"r{i}.bin", blob) for i in range(args.files)])
    big = png(6000, 6000)  # ~120 KB, 36 Mpx to decode
    return args.clients or 2, multipart([(f"p{i}.png", big) for i in range(args.files)])


def start_server(tree: Path, run: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "cifake.demo", "--run", str(run), "--port",
                          "0", *extra], cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if "http://" not in line:
        raise SystemExit(f"the server did not start: {line!r}")
    return p, int(line.split()[3].rsplit(":", 1)[1].strip("/"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="source tree whose page to run")
    ap.add_argument("--run", type=Path, help="run directory (default: a tiny NumPy MLP)")
    ap.add_argument("--scenario", choices=("bodies", "pixels"), default="pixels")
    ap.add_argument("--clients", type=int, help="uploads sent at once (default 4 bodies, 2 pixels)")
    ap.add_argument("--files", type=int, default=16, help="files per upload")
    ap.add_argument("--file-mb", type=float, default=16, help="MB per file (bodies)")
    ap.add_argument("--server-args", default="", help="extra flags for cifake.demo")
    args = ap.parse_args()
    run = args.run
    if run is None:
        sys.path.insert(0, str(REPO))
        from tests.helpers import mlp_run
        run = mlp_run(Path(tempfile.mkdtemp(prefix="cifake-load-")) / "run")
    clients, body = scenario(args)
    server, port = start_server(args.tree.resolve(), run, args.server_args.split())
    try:
        time.sleep(1.0)
        base = rss(server.pid)
        watch = Watch(server.pid, port)
        watch.start()
        t0 = time.monotonic()
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(post(port, body)))
                   for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flood_s = time.monotonic() - t0
        watch.stop.set()
        watch.join()
        time.sleep(3.0)
        report(args, clients, len(body), base, watch, flood_s, results, rss(server.pid))
    finally:
        server.terminate()
        server.wait(30)


def report(args, clients, size, base, watch, flood_s, results, after) -> None:
    mb = 2**20
    small, page = watch.small or [0.0], watch.page or [0.0]
    print(json.dumps({
        "tree": str(args.tree), "scenario": args.scenario, "clients": clients,
        "request_bytes": size, "flood_s": round(flood_s, 1), "flood_statuses": sorted(results),
        "rss_before_mib": round(base / mb), "rss_peak_mib": round(watch.peak / mb),
        "rss_after_mib": round(after / mb),
        "small_upload_s": {"n": len(small), "median": round(statistics.median(small), 3),
                           "max": round(max(small), 3), "statuses": sorted(set(watch.statuses))},
        "page_s": {"n": len(page), "median": round(statistics.median(page), 3),
                   "max": round(max(page), 3)}}, indent=1))


if __name__ == "__main__":
    main()
