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
import os
import socket
import threading
from pathlib import Path

from data.errors import UserError, run_cli
from data.images import MAX_FILE_BYTES
from core.predict import DEFAULT_THRESHOLD, add_device_flag, check_threshold
from core.flags import ArgumentParser
from core.rundir import read_json
from .stacks import STACKS, load_detector

PROG = "python -m cifake.demo"
MAX_UPLOAD_FILES = 64  # images per request: bounds the memory one request can take


# ------------------------------------------------------------------ training tab
def _polyline(xs, ys, x0, x1, y0, y1, box) -> str:
    left, top, w, h = box
    pts = [(left + (x - x0) / ((x1 - x0) or 1) * w, top + h - (y - y0) / ((y1 - y0) or 1) * h)
           for x, y in zip(xs, ys) if y is not None]
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)


def curves_svg(history: list[dict]) -> str:
    """Accuracy and loss per epoch (train, validation when the run holds a split out, and
    test) as one inline SVG: no plotting library on the server, no script in the browser."""
    panels = [("accuracy %", "_acc"), ("loss", "_loss")]
    series = (("train", "#1f77b4"), ("val", "#2ca02c"), ("test", "#d62728"))
    shown = [(name, color) for name, color in series
             if any(isinstance(h.get(name + suffix), (int, float))
                    for h in history for _, suffix in panels)]
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    W, H, pad = 340, 220, 40
    parts = [f'<svg id="curves" xmlns="http://www.w3.org/2000/svg" width="{2 * W}" '
             f'height="{H}" font-size="11" font-family="sans-serif">']
    for k, (title, suffix) in enumerate(panels):
        vals = [h.get(name + suffix) for h in history for name, _ in shown
                if isinstance(h.get(name + suffix), (int, float))]
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
                     f'<text x="{left}" y="{top + h + 14}">epoch {x0}</text>'
                     f'<text x="{left + w}" y="{top + h + 14}" text-anchor="end">{x1}</text>')
        for name, color in shown:
            key = name + suffix
            ys = [h.get(key) if isinstance(h.get(key), (int, float)) else None for h in history]
            pts = _polyline(epochs, ys, x0, x1, y0, y1, box)
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
    e = html.escape
    try:
        metrics = read_json(run_dir / "metrics.json")
    except UserError as err:
        metrics, note = {}, f"<p>No training curves: {e(str(err))}</p>"
    else:
        note = ""
    history = [h for h in metrics.get("history", []) if isinstance(h, dict)]
    final = metrics.get("final") if isinstance(metrics.get("final"), dict) else {}
    rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
                   for k, v in final.items() if isinstance(v, (int, float, str)))
    out = [note, f"<h3>Training curves ({len(history)} epoch(s)"
                 f"{'' if metrics.get('complete', True) else ', run not finished'})</h3>"]
    if history:
        out.append(curves_svg(history))
    if rows:
        out.append(f'<h3>Final metrics</h3><table id="final">{rows}</table>')
    if bench is not None:
        out.append(f'<h3>Bench table <small>({e(str(bench))})</small></h3>'
                   f'<pre id="bench">{e(bench.read_text(errors="replace"))}</pre>')
    else:
        out.append('<p id="bench">No bench table: run <code>cifake-bench</code> (it writes '
                   'results/bench/&lt;time&gt;/table.txt) or pass --bench.</p>')
    return "\n".join(out)


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
 .error { color: #b00; }
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
<section id="training" hidden>__TRAINING__</section>
<script>
const $ = (id) => document.getElementById(id);
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
async function score(files) {
  files = Array.from(files);
  if (!files.length) return;
  $("status").textContent = "scoring " + files.length + " image(s)...";
  const form = new FormData();
  files.forEach((f) => form.append("images", f, f.name));
  let records;
  try {
    const r = await fetch("api/predict", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    records = body;
  } catch (e) { $("status").textContent = "error: " + e.message; return; }
  const tbody = $("results").tBodies[0];
  records.forEach((rec, i) => {
    const row = tbody.insertRow(0);
    row.className = "result";
    row.dataset.name = rec.path;
    const img = document.createElement("img");
    img.src = URL.createObjectURL(files[i]); row.insertCell().appendChild(img);
    cell(row, rec.path);
    if (rec.error) {
      row.dataset.error = rec.error;
      cell(row, "-"); cell(row, "error", "error"); cell(row, rec.error, "error");
    } else {
      row.dataset.pFake = rec.p_fake;
      cell(row, rec.p_fake.toFixed(4), "p-fake"); cell(row, rec.label, "label " + rec.label);
      const ood = cell(row, rec.out_of_distribution ? "out of distribution: " + rec.ood_reason : "",
                       rec.out_of_distribution ? "ood" : "");
      row.dataset.ood = rec.out_of_distribution ? "1" : "0";
    }
  });
  $("status").textContent = "scored " + records.length + " image(s)";
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
    try:
        doc = read_json(path)
        row = next(r for r in doc["rows"] if r.get("chosen"))
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


def build_app(detector, threshold: float, bench: Path | None, realworld: Path | None = None):
    """The Starlette app: GET / (the page), POST /api/predict (multipart field 'images',
    one or more files -> JSON list of result records), GET /api/run (config + metrics)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    lock = threading.Lock()  # one forward pass at a time: models are not re-entrant
    cfg = detector.config
    e = html.escape

    def page(request):
        body = (PAGE.replace("__TITLE__", e(detector.run_dir.name))
                .replace("__RUN__", e(str(detector.run_dir)))
                .replace("__MODEL__", e(str(cfg.get("model"))))
                .replace("__STACK__", e(detector.stack))
                .replace("__DEVICE__", e(detector.device))
                .replace("__THRESHOLD__", e(f"{threshold:g}"))
                .replace("__REALWORLD__", realworld_html(realworld, detector.run_dir))
                .replace("__TRAINING__", training_html(detector.run_dir, bench)))
        return HTMLResponse(body)

    async def predict(request):
        try:
            form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=8)
        except Exception as err:  # malformed multipart, too many files
            return JSONResponse({"error": f"bad upload ({err})"}, status_code=400)
        files = [f for f in form.getlist("images") if hasattr(f, "read")]
        if not files:
            return JSONResponse({"error": "no file in field 'images'"}, status_code=400)
        names, blobs = [], []
        for f in files:
            # one byte over the limit is enough to refuse; the decoder names the file
            blobs.append(await f.read(MAX_FILE_BYTES + 1))
            names.append(f.filename or "upload")
        await form.close()

        def run():
            with lock:
                return detector.predict(blobs, threshold=threshold)
        records = await run_in_threadpool(run)
        for rec, name in zip(records, names):
            rec["path"] = name
            if rec["error"]:  # the decoder names inputs by position; the user knows names
                rec["error"] = rec["error"].replace(f"input {rec['index']}", name, 1)
        return JSONResponse(records)

    def run_info(request):
        try:
            metrics = read_json(detector.run_dir / "metrics.json")
        except UserError:
            metrics = None
        return JSONResponse({"config": cfg, "metrics": metrics, "stack": detector.stack,
                             "device": detector.device, "threshold": threshold})

    return Starlette(routes=[Route("/", page), Route("/api/predict", predict, methods=["POST"]),
                             Route("/api/run", run_info)])


def main(argv: list[str] | None = None) -> int:
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
                    help="address to listen on (0.0.0.0 makes the page reachable from other "
                         "machines)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free one")
    ap.add_argument("--bench", help="a bench table.txt or its folder (default: the newest "
                                    "results/bench/*/table.txt here, if any)")
    ap.add_argument("--realworld", help="a cifake.realworld realworld.json (or its folder) "
                    "measured for this run; the page shows its real-photo false-positive "
                    "rate (default: RUN/realworld.json, if any)")
    args = ap.parse_args(argv)
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
    app = build_app(detector, args.threshold, bench, realworld)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there "
                        f"({err.strerror or err})") from None
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    # the first stdout line is the address: a script (or a test) reads it to connect
    print(f"CIFAKE detector page: http://{shown}:{port}/  (Ctrl-C stops it)", flush=True)
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
