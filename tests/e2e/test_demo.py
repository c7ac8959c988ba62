"""The local web page (cifake-demo), in a real browser: headless Chromium driven by
Playwright uploads images (file picker and drag-and-drop) and reads P(FAKE) from the page,
then opens the training tab. Skipped where Chromium or Playwright is absent, except in CI
(CIFAKE_REQUIRE_OPTIONAL=1, set by .ci/run), where that is a failure."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import require_modules, skip_or_fail, synthetic_image
from tests.helpers import assert_user_error, cmd, env, run
from tests.helpers import mlp_run

HISTORY = [{"epoch": e, "train_acc": 60 + 5 * e, "test_acc": 58 + 4 * e,
            "train_loss": 0.7 - 0.1 * e, "test_loss": 0.72 - 0.08 * e} for e in (1, 2, 3)]
BENCH_TABLE = "backend    dev  model  budget acc %\nnumpy-mlp  cpu  mlp4   61.66\n"


def chromium_path() -> str | None:
    """Debian's chromium (no browser download is possible on the project's machines);
    CIFAKE_CHROMIUM names another binary."""
    for p in (os.environ.get("CIFAKE_CHROMIUM"), "/usr/lib/chromium/chromium",
              shutil.which("chromium"), shutil.which("chromium-browser")):
        if p and os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture
def demo_run(tmp_path):
    r = mlp_run(tmp_path / "run")
    (r / "metrics.json").write_text(json.dumps({"history": HISTORY, "complete": True,
                                                "final": {"test_acc": 70.0, "roc_auc": 0.8}}))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "table.txt").write_text(BENCH_TABLE)
    # what cifake.realworld --out RUN leaves: the page shows the chosen row's figures
    (r / "realworld.json").write_text(json.dumps({
        "rows": [{"key": "box", "chosen": False, "n": 16, "n_fake": 9, "mean_p_fake": 0.6},
                 {"key": "bilinear+jpeg75", "chosen": True, "n": 16, "n_fake": 3,
                  "mean_p_fake": 0.25}],
        "roundtrip": {"rows": {"bilinear+jpeg75": {"FAKE": 0.6, "REAL": 0.99}}}}))
    return r


@pytest.fixture
def server(demo_run, tmp_path):
    """``python -m cifake.demo`` on a free port; yields its address."""
    require_modules("starlette", "uvicorn", "multipart", extra="demo")
    p = subprocess.Popen(cmd("cifake.demo", "--run", demo_run, "--port", "0", "--bench",
                             tmp_path / "bench"), cwd=tmp_path, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(p.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    try:
        assert first and "http://" in first[0], f"no address printed; stderr: " \
            f"{p.stderr.read() if p.poll() is not None else '(still running)'}"
        yield first[0].split()[3]
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_demo_page_in_a_real_browser(server, demo_run, tmp_path):
    exe = chromium_path()
    if exe is None:
        skip_or_fail("no Chromium (apt-get install chromium, or set CIFAKE_CHROMIUM)")
    require_modules("playwright", extra="test")
    from playwright.sync_api import sync_playwright

    from numpy_mlp.predict import Detector
    files = []
    for i, size in enumerate((32, 32, 64)):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(synthetic_image(i % 2, i, size=size)).save(f)
        files.append(f)
    want = {Path(r["path"]).name: r for r in Detector.load(demo_run).predict(files)}

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server)
            # two images through the file picker
            page.set_input_files("#files", [str(files[0]), str(files[2])])
            page.locator("tr.result").nth(1).wait_for()
            # one more dropped on the drop zone
            page.evaluate("""([name, bytes]) => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""", [files[1].name, list(files[1].read_bytes())])
            page.locator("tr.result").nth(2).wait_for()
            rows = page.locator("tr.result")
            seen = {}
            for i in range(rows.count()):
                row = rows.nth(i)
                seen[row.get_attribute("data-name")] = (
                    float(row.get_attribute("data-p-fake")),
                    row.locator(".p-fake").inner_text(), row.locator(".label").inner_text())
            assert set(seen) == set(want)
            for name, (p, shown, label) in seen.items():
                assert p == pytest.approx(want[name]["p_fake"], abs=1e-9)
                assert shown == f"{want[name]['p_fake']:.4f}" and label == want[name]["label"]
            big = page.locator("tr.result", has_text="img2.png")
            assert big.get_attribute("data-ood") == "1"
            assert "out of distribution: shrunk from 64x64 to 32x32" in big.inner_text()
            assert page.locator("tr.result", has_text="img0.png").get_attribute("data-ood") == "0"
            # the measured real-photo false-positive rate stands next to the verdicts
            rw = page.locator("#realworld").inner_text()
            assert "3 of 16" in rw and "40%" in rw
            # the training tab: curves drawn from metrics.json, and the bench table
            page.click("#tab-training")
            assert page.locator("#curves polyline.test_acc").is_visible()
            assert page.locator("#curves polyline.train_loss").count() == 1
            assert "numpy-mlp" in page.locator("#bench").inner_text()
            assert all(u.startswith(server) or u.startswith(("blob:", "data:")) for u in requests), \
                [u for u in requests if not u.startswith(server)]  # nothing from the internet
        finally:
            browser.close()


def test_demo_refuses_bad_arguments_with_one_line(tmp_path, demo_run):
    require_modules("starlette", "uvicorn", "multipart", extra="demo")
    assert_user_error(run("cifake.demo", "--run", tmp_path / "nope", "--port", "0"), "nope")
    assert_user_error(run("cifake.demo", "--run", demo_run, "--bench", tmp_path / "nobench",
                          "--port", "0"), "nobench")
    assert_user_error(run("cifake.demo", "--run", demo_run, "--port", "70000"), "70000")


def test_training_tab_without_metrics_or_bench(tmp_path):
    from cifake.demo import curves_svg, training_html
    r = mlp_run(tmp_path / "run")
    text = training_html(r, None)
    assert "No training curves" in text and "metrics.json" in text and "cifake-bench" in text
    svg = curves_svg([{"epoch": 1, "train_acc": 50.0}, {"epoch": 2, "train_acc": 60.0,
                                                          "test_acc": 55.0}])
    assert svg.count("<polyline") == 2  # train and test accuracy; no loss recorded


def test_curves_show_the_validation_split_when_the_run_holds_one():
    from cifake.demo import curves_svg
    rows = [{"epoch": e, "train_acc": 50.0 + e, "val_acc": 49.0 + e, "test_acc": 48.0 + e,
             "train_loss": 0.7 - e / 10, "val_loss": 0.72 - e / 10, "test_loss": 0.74 - e / 10}
            for e in (1, 2)]
    svg = curves_svg(rows)
    assert svg.count("<polyline") == 6
    assert 'class="val_acc"' in svg and 'class="val_loss"' in svg and ">val</text>" in svg
    plain = curves_svg([{k: v for k, v in r.items() if not k.startswith("val")} for r in rows])
    assert plain.count("<polyline") == 4 and "val" not in plain
