"""A local web page for a trained run: ``python -m cifake.demo --run RUN_DIR`` (= ``cifake-demo``).

Tab "Score images": drop one or several images (or pick them), see P(FAKE) and the
verdict of each. Tab "Training": the run's curves from metrics.json, its final metrics,
and the bench table (``--bench``, default the newest ``results/bench/*/table.txt`` under
the current folder) when there is one.

Why Starlette and not Gradio: the page must work with no internet, and Gradio's front end
fetches web fonts from a CDN and pulls a large, fast-moving dependency tree; this page is
one HTML string with inline CSS and JavaScript and server-drawn SVG, so nothing is loaded
from anywhere but this server, and the ``demo`` extra is three small packages
(starlette, uvicorn, python-multipart). It listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import glob
import html
import json
import math
import os
import socket
import sys
from pathlib import Path

from data.errors import UserError, run_cli
from core import flags
from core.predict import DEFAULT_THRESHOLD, add_device_flag, check_threshold
from core.flags import ArgumentParser
from core.rundir import read_json
from .battery import battery_html
from .realworld import read_result
from .stacks import STACKS, load_detector
from .webguard import LOOPBACK_NAMES, WILDCARDS, BodyLimit, HostCheck, MiB, is_loopback, \
    json_safe, network_names, url_host
from .webscore import MAX_UPLOAD_FILES, RETRY_AFTER_S, Scorer, WebLimits

PROG = "python -m cifake.demo"


# ------------------------------------------------------------------ training tab
CURVE_SUFFIXES = ("_acc", "_loss")


def finite(v) -> float | None:
    """``v`` when it is a finite real number (a bool is not one), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def clean_history(history) -> tuple[list[dict], list[str]]:
    """metrics.json's "history", whatever its shape -> the epochs the curves can draw
    (an "epoch" number and the finite ``*_acc`` / ``*_loss`` values of each) and notes
    saying what was left out and why."""
    if history is None:
        return [], []
    if not isinstance(history, list):
        return [], [f"'history' is {_kind(history)}, not a list of epochs: no curves"]
    rows = [h for h in history if isinstance(h, dict)]
    notes = []
    if len(rows) < len(history):
        notes.append(f"{len(history) - len(rows)} of the {len(history)} entries of 'history' "
                     f"are not objects: left out")
    epochs = [finite(h.get("epoch", i + 1)) for i, h in enumerate(rows)]
    if any(e is None for e in epochs):
        notes.append("some epochs are not numbers (text, null, NaN): the curves number the "
                     "epochs in order instead")
        epochs = list(range(1, len(rows) + 1))
    clean, dropped = [], 0
    for epoch, h in zip(epochs, rows):
        row = {"epoch": epoch}
        for key, v in h.items():
            if isinstance(key, str) and key.endswith(CURVE_SUFFIXES) and v is not None:
                if finite(v) is None:
                    dropped += 1
                else:
                    row[key] = v
        clean.append(row)
    if dropped:
        notes.append(f"{dropped} value(s) are not finite numbers (NaN, infinity or text): "
                     f"left out of the curves")
    return clean, notes


def _kind(v) -> str:
    return "null" if v is None else f"a {type(v).__name__}"


def _polyline(xs, ys, x0, x1, y0, y1, box) -> str:
    left, top, w, h = box
    dx = (x1 - x0) if math.isfinite(x1 - x0) and x1 != x0 else 1
    dy = (y1 - y0) if math.isfinite(y1 - y0) and y1 != y0 else 1
    pts = [(left + (x - x0) / dx * w, top + h - (y - y0) / dy * h)
           for x, y in zip(xs, ys) if y is not None]
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in pts if math.isfinite(x) and math.isfinite(y))


def curves_svg(history) -> str:
    """Accuracy and loss per epoch (train, validation when the run holds a split out, and
    test) as one inline SVG: no plotting library on the server, no script in the browser.
    Values that are not finite numbers are left out (``clean_history``)."""
    history, _ = clean_history(history)
    panels = [("accuracy %", "_acc"), ("loss", "_loss")]
    series = (("train", "#1f77b4"), ("val", "#2ca02c"), ("test", "#d62728"))
    shown = [(name, color) for name, color in series
             if any(name + suffix in h for h in history for _, suffix in panels)]
    epochs = [h["epoch"] for h in history]
    W, H, pad = 340, 220, 40
    parts = [f'<svg id="curves" xmlns="http://www.w3.org/2000/svg" width="{2 * W}" '
             f'height="{H}" font-size="11" font-family="sans-serif">']
    for k, (title, suffix) in enumerate(panels):
        vals = [h[name + suffix] for h in history for name, _ in shown if name + suffix in h]
        box = (k * W + pad, 20, W - pad - 10, H - 50)
        left, top, w, h = box
        parts.append(f'<text x="{left}" y="12">{title}</text>'
                     f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" '
                     f'stroke="#999"/>')
        if not vals or not epochs:
            continue
        y0, y1 = min(vals), max(vals)
        x0, x1 = min(epochs), max(epochs)
        parts.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{y1:.3g}</text>'
                     f'<text x="{left - 4}" y="{top + h}" text-anchor="end">{y0:.3g}</text>'
                     f'<text x="{left}" y="{top + h + 14}">epoch {x0:g}</text>'
                     f'<text x="{left + w}" y="{top + h + 14}" text-anchor="end">{x1:g}</text>')
        for name, color in shown:
            key = name + suffix
            pts = _polyline(epochs, [h.get(key) for h in history], x0, x1, y0, y1, box)
            if pts:
                parts.append(f'<polyline class="{key}" points="{pts}" fill="none" '
                             f'stroke="{color}" stroke-width="2"/>')
                for p in pts.split():
                    x, y = p.split(",")
                    parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>')
        parts.extend(f'<text x="{left + 6 + 44 * i}" y="{top + h + 30}" fill="{color}">'
                     f'{name}</text>' for i, (name, color) in enumerate(shown))
    parts.append("</svg>")
    return "".join(parts)


def given_file(value: str, flag: str, name: str) -> Path:
    """A flag naming ``name`` or the folder holding it -> the file, or a one-line error."""
    p = Path(value)
    p = p / name if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{flag} {value}: no {name} there")
    return p


def find_bench_table(bench: str | None) -> Path | None:
    """--bench (a table.txt or a folder holding one), else the newest bench output under
    the current folder; None when there is none."""
    if bench:
        return given_file(bench, "--bench", "table.txt")
    found = sorted(glob.glob(os.path.join("results", "bench", "*", "table.txt")))
    return Path(found[-1]) if found else None


def training_html(run_dir: Path, bench: Path | None) -> str:
    """The training tab: curves and final metrics from metrics.json, then the bench table.
    A metrics.json of the wrong shape gives a note saying what is wrong, never an error."""
    e = html.escape
    try:
        metrics = read_json(run_dir / "metrics.json")
    except UserError as err:
        metrics, notes = {}, [f"No training curves: {err}"]
    else:
        notes = []
    history, why = clean_history(metrics.get("history"))
    final = metrics.get("final")
    if final is not None and not isinstance(final, dict):
        why.append(f"'final' is {_kind(final)}, not an object of metrics")
    final = final if isinstance(final, dict) else {}
    notes += [f"{run_dir / 'metrics.json'}: {w}" for w in why]
    rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
                   for k, v in final.items() if isinstance(v, (int, float, str)))
    out = [f'<p class="note">{e(n)}</p>' for n in notes]
    out.append(f"<h3>Training curves ({len(history)} epoch(s)"
               f"{'' if metrics.get('complete', True) else ', run not finished'})</h3>")
    if history:
        out.append(curves_svg(history))
    if rows:
        out.append(f'<h3>Final metrics</h3><table id="final">{rows}</table>')
    out.append(bench_html(bench))
    return "\n".join(out)


BENCH_MAX_BYTES = 256 * 1024  # a bench table is a few KB


def bench_html(bench: Path | None) -> str:
    e = html.escape
    if bench is None:
        return ('<p id="bench">No bench table: run <code>cifake-bench</code> (it writes '
                'results/bench/&lt;time&gt;/table.txt) or pass --bench.</p>')
    try:
        with open(bench, "rb") as f:
            text = f.read(BENCH_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError as err:
        return (f'<p id="bench">Bench table {e(str(bench))}: cannot read '
                f'({e(err.strerror or str(err))})</p>')
    return (f'<h3>Bench table <small>({e(str(bench))})</small></h3>'
            f'<pre id="bench">{e(text)}</pre>')


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------ page
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<link rel="icon" href="data:,">
<title>CIFAKE detector: __TITLE__</title>
<style>
 body { font-family: sans-serif; margin: 1.5em; max-width: 900px; }
 nav button { font-size: 1em; padding: .4em 1em; }
 nav button.on { font-weight: bold; }
 #drop { border: 2px dashed #888; padding: 2em; text-align: center; margin: 1em 0; }
 #drop.over { background: #eef; }
 table { border-collapse: collapse; } td, th { padding: .25em .8em; text-align: left; }
 tr.result img { width: 64px; height: 64px; image-rendering: pixelated; }
 .FAKE { color: #b00; font-weight: bold; } .REAL { color: #070; font-weight: bold; }
 .error { color: #b00; } .note { color: #a50; }
</style></head><body>
<h2>CIFAKE detector</h2>
<p>Run <code>__RUN__</code> (__MODEL__, scored by __STACK__ on __DEVICE__).
Verdict FAKE when P(FAKE) &ge; __THRESHOLD__. The detector was trained on 32&times;32
images; larger ones are cropped to their centre square and shrunk to 32&times;32 first
(bilinear, then JPEG quality 75, as CIFAKE's files were stored), which it has not seen in
training: their verdicts are marked <b>out of distribution</b>.</p>
<p id="realworld">__REALWORLD__</p>
<nav><button id="tab-score" class="on">Score images</button>
<button id="tab-training">Training</button></nav>
<section id="score">
 <div id="drop">Drop images here, or <input id="files" type="file" accept="image/*" multiple></div>
 <p id="status"></p>
 <table id="results"><thead><tr><th></th><th>file</th><th>P(FAKE)</th><th>verdict</th>
 <th></th></tr></thead><tbody></tbody></table>
</section>
<section id="training" hidden>__TRAINING__
<h3>Robustness</h3><div id="battery">__BATTERY__</div></section>
<script>
const $ = (id) => document.getElementById(id);
const LIMITS = __LIMITS__;  // what one upload may hold: the server's --max-request-mb
function show(tab) {
  $("score").hidden = tab !== "score"; $("training").hidden = tab !== "training";
  $("tab-score").className = tab === "score" ? "on" : "";
  $("tab-training").className = tab === "training" ? "on" : "";
}
$("tab-score").onclick = () => show("score");
$("tab-training").onclick = () => show("training");
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function addRow(file, rec) {
  const row = $("results").tBodies[0].insertRow(0);
  row.className = "result";
  row.dataset.name = rec.path;
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file); row.insertCell().appendChild(img);
  cell(row, rec.path);
  if (rec.error) {
    row.dataset.error = rec.error;
    cell(row, "-"); cell(row, "error", "error"); cell(row, rec.error, "error");
  } else {
    row.dataset.pFake = rec.p_fake;
    cell(row, rec.p_fake.toFixed(4), "p-fake"); cell(row, rec.label, "label " + rec.label);
    cell(row, rec.out_of_distribution ? "out of distribution: " + rec.ood_reason : "",
         rec.out_of_distribution ? "ood" : "");
    row.dataset.ood = rec.out_of_distribution ? "1" : "0";
  }
}
const PART = 1024;  // bytes of multipart headers counted per file
function takeBatch(queue) {  // the first files of the queue that fit in one upload
  const batch = []; let size = 0;
  while (queue.length && batch.length < LIMITS.max_files) {
    const cost = queue[0].size + PART;
    if (batch.length && size + cost > LIMITS.max_body) break;
    batch.push(queue.shift()); size += cost;
  }
  return batch;
}
async function post(files) {
  const form = new FormData();
  files.forEach((f) => form.append("images", f, f.name));
  for (let attempt = 0; ; attempt++) {
    const r = await fetch("api/predict", { method: "POST", body: form });
    const text = await r.text();
    let body;
    try { body = JSON.parse(text); } catch (e) { body = { error: text.trim() || r.statusText }; }
    if (r.status === 503 && attempt < 5) {  // busy: wait as told, then try again
      const wait = Number(r.headers.get("Retry-After")) || 5;
      $("status").textContent = "the page is busy; trying again in " + wait + " s...";
      await new Promise((done) => setTimeout(done, wait * 1000));
      continue;
    }
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
}
async function score(files) {
  let queue = Array.from(files);
  const total = queue.length;
  let scored = 0;
  while (queue.length) {
    $("status").textContent = "scoring " + total + " image(s)... (" + scored + " done)";
    const first = queue[0];
    if (first.size + PART > LIMITS.max_body) {  // never sent: one file over the limit
      queue.shift(); scored++;
      addRow(first, { path: first.name, error: first.name + ": " +
        (first.size / 1048576).toFixed(1) + " MiB, more than this page accepts in one upload (" +
        LIMITS.max_body_mib + " MiB, --max-request-mb)" });
      continue;
    }
    const batch = takeBatch(queue);
    let records;
    try { records = await post(batch); }
    catch (e) { $("status").textContent = "error: " + e.message; return; }
    const again = [];  // over this upload's pixel budget: sent again in the next one
    records.forEach((rec, i) => {
      if (rec.deferred) again.push(batch[i]); else { addRow(batch[i], rec); scored++; }
    });
    if (again.length === batch.length) {
      $("status").textContent = "error: nothing scored"; return;
    }
    queue = again.concat(queue);
  }
  $("status").textContent = "scored " + scored + " image(s)";
}
$("files").onchange = (e) => score(e.target.files);
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); score(e.dataTransfer.files); };
</script></body></html>
"""


def find_realworld(realworld: str | None, run_dir: Path) -> Path | None:
    """--realworld (a cifake.realworld realworld.json or its folder), else the run's own
    ``realworld.json`` if ``cifake.realworld --out RUN`` wrote one; None when there is none."""
    if realworld:
        return given_file(realworld, "--realworld", "realworld.json")
    p = run_dir / "realworld.json"
    return p if p.is_file() else None


def realworld_html(path: Path | None, run_dir: Path) -> str:
    """The measured real-photo false-positive rate of the preprocessing predict uses, for
    this run, next to every verdict -- or a plain statement that it was not measured."""
    e = html.escape
    if path is None:
        return ("How often this run calls a genuine photo FAKE has <b>not been measured</b>: "
                f"<code>python -m cifake.realworld --run {e(str(run_dir))} --out "
                f"{e(str(run_dir))}</code> measures it.")
    doc = read_result(path)  # its shape checked: a damaged file is one UserError line
    try:
        row = next(r for r in doc["rows"] if r["chosen"])
        text = (f"Measured for this run ({e(str(path))}): <b>{int(row['n_fake'])} of "
                f"{int(row['n'])}</b> genuine photographs were called FAKE after this "
                f"preprocessing (mean P(FAKE) {float(row['mean_p_fake']):.2f}).")
        rt = (doc.get("roundtrip") or {}).get("rows", {}).get(row["key"])
        if rt:
            text += (f" The same preprocessing lets {100 * (1 - float(rt['FAKE'])):.0f}% of "
                     f"CIFAKE's own fakes through as REAL once they have been enlarged and "
                     f"shrunk back: on a resized image, neither verdict is strong evidence.")
        return text
    except (UserError, KeyError, StopIteration, TypeError, ValueError) as err:
        raise UserError(f"{path}: not a cifake.realworld result ({err})") from None


# ------------------------------------------------------------------ the app
def page_html(detector, threshold: float, bench: Path | None, realworld: Path | None,
              limits: WebLimits) -> str:
    e = html.escape
    try:
        realworld_text = realworld_html(realworld, detector.run_dir)
    except UserError as err:  # the file changed since start-up
        realworld_text = e(str(err))
    try:
        battery_text = battery_html(detector.run_dir)
    except UserError as err:  # a damaged battery.json is a note, not a failed page
        battery_text = f'<p class="note">{e(str(err))}</p>'
    js_limits = json.dumps({"max_body": limits.max_body, "max_files": MAX_UPLOAD_FILES,
                            "max_body_mib": round(limits.max_body / MiB, 2)})
    return (PAGE.replace("__TITLE__", e(detector.run_dir.name))
            .replace("__RUN__", e(str(detector.run_dir)))
            .replace("__MODEL__", e(str(detector.config.get("model"))))
            .replace("__STACK__", e(detector.stack))
            .replace("__DEVICE__", e(detector.device))
            .replace("__THRESHOLD__", e(f"{threshold:g}"))
            .replace("__LIMITS__", js_limits)
            .replace("__REALWORLD__", realworld_text)
            .replace("__TRAINING__", training_html(detector.run_dir, bench))
            .replace("__BATTERY__", battery_text))


def build_app(detector, threshold: float, bench: Path | None, realworld: Path | None = None,
              limits: WebLimits | None = None, hosts=LOOPBACK_NAMES,
              url: str = "http://127.0.0.1:8000/"):
    """The page as an ASGI app: GET / (the page), POST /api/predict (multipart field
    'images', one or more files -> JSON list of result records), GET /api/run (config +
    metrics), behind the Host check (the names in ``hosts``; ``url`` is named to others)
    and the body limit (``limits.max_body``)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    limits = limits or WebLimits()

    def page(request):
        return HTMLResponse(page_html(detector, threshold, bench, realworld, limits))

    def run_info(request):
        try:
            metrics = read_json(detector.run_dir / "metrics.json")
        except UserError:
            metrics = None
        return JSONResponse(json_safe({"config": detector.config, "metrics": metrics,
                                       "stack": detector.stack, "device": detector.device,
                                       "threshold": threshold}))

    scorer = Scorer(detector, threshold, limits)
    app = Starlette(routes=[Route("/", page),
                            Route("/api/predict", scorer.predict, methods=["POST"]),
                            Route("/api/run", run_info)])
    app.state.scorer = scorer
    guarded = HostCheck(BodyLimit(app, limits.max_body), hosts, url)
    guarded.state = app.state
    return guarded


# ------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None):
    ap = ArgumentParser(prog=PROG, description="A local web page: drop images on it to see "
                        "P(FAKE); a second tab shows the run's training curves.",
                        epilog=f"example:\n  {PROG} --run runs/detector   # then open the "
                               f"address it prints")
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("--stack", choices=list(STACKS),
                    help="stack that scores (default: the one that trained --run)")
    add_device_flag(ap)
    ap.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                    help="verdict FAKE when P(FAKE) >= this")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; anything but a loopback address (0.0.0.0, "
                         "::, a network address) makes the page, which has no "
                         "authentication, usable by anyone who can reach this machine")
    ap.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free one")
    ap.add_argument("--allow-host", action="append", metavar="NAME",
                    help="another name the page answers to in the Host header (e.g. this "
                         "machine's DNS name with --host 0.0.0.0); repeatable. It always "
                         "answers to 127.0.0.1, localhost, [::1] and --host")
    d = WebLimits()
    ap.add_argument("--max-request-mb", type=flags.integer("--max-request-mb", 1, 4096),
                    default=d.max_body // MiB, metavar="MIB",
                    help="largest upload, in MiB (2**20 bytes), all its images together; a "
                         "larger one is refused (413) before it is stored. The page splits a "
                         "larger drop into several uploads")
    ap.add_argument("--max-request-mpx", type=flags.integer("--max-request-mpx", 1, 100_000),
                    default=d.max_pixels // 10**6, metavar="MPX",
                    help="decoded pixels per upload, in megapixels (10**6 pixels; a 6000x6000 "
                         "image is 36): images past it get an error naming them (the page "
                         "sends them again in its next upload)")
    ap.add_argument("--workers", type=flags.integer("--workers", 1, 64), default=d.workers,
                    help="uploads decoded and scored at once; one more is kept for small "
                         f"uploads (at most {d.small_body // MiB} MiB and "
                         f"{d.small_pixels / 1e6:g} Mpx), so large ones cannot hold up small ones")
    ap.add_argument("--queue", type=flags.integer("--queue", 0, 1024), default=d.queue,
                    help="uploads that may wait for a worker (each lane); more are refused "
                         f"with 503 and Retry-After: {RETRY_AFTER_S} (seconds)")
    ap.add_argument("--bench", help="a bench table.txt or its folder (default: the newest "
                                    "results/bench/*/table.txt here, if any)")
    ap.add_argument("--realworld", help="a cifake.realworld realworld.json (or its folder) "
                    "measured for this run; the page shows its real-photo false-positive "
                    "rate (default: RUN/realworld.json, if any)")
    return ap.parse_args(argv)


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there "
                        f"({err.strerror or err})") from None
    sock.listen(2048)  # connections made once the address is printed wait for the server
    return sock


def addresses(host: str, bound: str, port: int, extra: list[str]) -> tuple[str, list[str], str]:
    """(the URL to print, the names the page answers to, a warning or '') for a page
    listening on ``bound`` (the address ``--host`` resolved to)."""
    names = [*LOOPBACK_NAMES, host, bound, *extra]
    if bound in WILDCARDS:
        local = "[::1]" if bound == "::" else "127.0.0.1"
        url, remote = f"http://{local}:{port}/", network_names()
        names += remote
        where = f"every network interface (--host {host})"
        reach = (f"Other machines open it at http://{remote[0]}:{port}/ (add a name it "
                 f"should answer to with --allow-host).") if remote else ""
    else:
        url, reach = f"http://{url_host(host)}:{port}/", ""
        where = f"{host} (not a loopback address)"
    if is_loopback(bound):
        return url, names, ""
    warning = (f"warning: listening on {where}: anyone who can reach this machine on port "
               f"{port} can use this page, which has no authentication, and read the run's "
               f"configuration and file paths. {reach}").rstrip()
    return url, names, warning


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import multipart  # noqa: F401  (starlette parses uploads with it)
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise UserError(f"the web page needs the 'demo' extra: pip install -e \".[demo]\" "
                        f"({err.name} is missing)") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: not a TCP port (0-65535)")
    bench = find_bench_table(args.bench)
    detector = load_detector(args.run, args.stack, args.device)
    realworld = find_realworld(args.realworld, detector.run_dir)
    realworld_html(realworld, detector.run_dir)  # a bad file is refused before serving
    limits = WebLimits(max_body=args.max_request_mb * MiB,
                       max_pixels=args.max_request_mpx * 10**6,
                       workers=args.workers, queue=args.queue)
    sock = listen(args.host, args.port)
    bound, port = sock.getsockname()[:2]
    url, names, warning = addresses(args.host, bound, port, args.allow_host or [])
    app = build_app(detector, args.threshold, bench, realworld, limits, names, url)
    # the first stdout line is the address: a script (or a test) reads it to connect
    print(f"CIFAKE detector page: {url}  (Ctrl-C stops it)", flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _threshold(s: str) -> float:
    try:
        return check_threshold(s)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


if __name__ == "__main__":
    run_cli(main, prog="cifake.demo")
