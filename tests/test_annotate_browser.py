"""``lowlabel annotate`` in a real browser: headless Chromium from the system's packages (Debian's
``chromium``), driven by Playwright, on a copy of a real shared dataset (isbi2012-em).

The page is opened, a positive click inside a cell runs the classical segmenter, the brush
paints, the mask is accepted; the written PNG must hold exactly what the page drew, ``lowlabel
validate`` must pass, and a reload must show the saved mask. A screenshot is kept beside the test's
files (and copied to ``$LOWLABEL_TEST_ARTEFACTS`` when that is set).

Skipped, with the reason, where Playwright or the browser is missing; nothing here downloads a
browser. ``LOWLABEL_CHROMIUM`` names another executable."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the annotate extra (fastapi, uvicorn) is not installed: pip install 'lowlabel[annotate]'")
pytest.importorskip("uvicorn", reason="the annotate extra (uvicorn) is not installed: pip install 'lowlabel[annotate]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install 'lowlabel[annotate]'")

from lowlabel.annotate import open_session  # noqa: E402
from lowlabel.annotate.app import serve  # noqa: E402
from lowlabel.cli import main  # noqa: E402
from lowlabel.data.validate import validate_dataset  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.shared]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CELL = (410, 217)  # (x, y) inside a cell of slice00 (class 0), where the classical segmenter answers with a region
STROKE = [(20, 30), (120, 30)]  # a brush stroke along row 30


def chromium() -> str:
    exe = os.environ.get("LOWLABEL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe or not Path(exe).exists():
        pytest.skip("no system Chromium (Debian: apt-get install chromium; or set LOWLABEL_CHROMIUM): the browser tests need one")
    return exe


@pytest.fixture
def dataset(shared_datasets, tmp_path):
    dst = tmp_path / "isbi2012-em"
    shutil.copytree(shared_datasets / "isbi2012-em", dst)
    return dst


@pytest.fixture
def server(dataset, tmp_path):
    store, assistant, predictions, _ = open_session(dataset, segmenter="classical", cache=tmp_path / "cache", user="browser-test")
    box, ready = {}, threading.Event()

    def on_ready(url, srv):
        box.update(url=url, server=srv)
        ready.set()

    t = threading.Thread(target=serve, args=(store, assistant, predictions), kwargs={"port": 0, "on_ready": on_ready}, daemon=True)
    t.start()
    assert ready.wait(30), "the server did not start"
    yield box["url"]
    box["server"].should_exit = True
    t.join(15)


@pytest.fixture
def page():
    exe = chromium()
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=60_000)
        except Exception as err:  # noqa: BLE001  (a browser that cannot start here: say why, do not fail)
            pytest.skip(f"{exe} does not start headless here: {str(err).splitlines()[0][:200]}")
        pg = browser.new_page(viewport={"width": 1200, "height": 820})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def state(pg):
    return pg.evaluate("window.lowlabelAnnotate.state()")


def wait_for(pg, expression: str, arg=None, timeout: float = 30.0):
    """Poll ``expression`` (a JavaScript function of ``arg``) until it is truthy. Not Playwright's
    wait_for_function, which evaluates a string, and the page's Content-Security-Policy (kept on
    in these tests) forbids that."""
    import time

    end = time.monotonic() + timeout
    while True:
        value = pg.evaluate(expression, arg)
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {expression} ({arg!r}); page status: {pg.locator('#status').inner_text()!r}")
        time.sleep(0.05)


def wait_open(pg, sid):
    wait_for(pg, "id => { const a = window.lowlabelAnnotate; return a && a.state().id === id && !a.state().busy; }", sid)


def page_xy(pg, x, y):
    """Where image pixel (x, y)'s centre is on the page."""
    r = pg.locator("#view").bounding_box()
    w, h = pg.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
    return r["x"] + (x + 0.5) * r["width"] / w, r["y"] + (y + 0.5) * r["height"] / h


def test_click_brush_save_validate_reload(server, dataset, page, tmp_path):
    original = np.asarray(Image.open(dataset / "masks" / "slice00.png"))
    assert original[CELL[1], CELL[0]] == 0  # inside a cell
    pg = page
    pg.goto(server)
    wait_open(pg, "slice00")
    assert pg.locator("#progress").inner_text() == "0 of 20 done"
    before = np.array(pg.evaluate("window.lowlabelAnnotate.label()"), np.uint8).reshape(original.shape)
    assert np.array_equal(before, original)  # it starts from the existing mask

    # a positive click inside the cell, as membrane (class 2 in the page's numbering, id 1)
    pg.keyboard.press("2")
    pg.keyboard.press("c")
    pg.mouse.move(*page_xy(pg, *CELL))
    pg.mouse.wheel(0, -400)  # zoom in about the cell: the click below must still land on its pixel
    wait_for(pg, "() => document.getElementById('view').style.transform.includes('scale(2.')")
    pg.mouse.click(*page_xy(pg, *CELL))
    wait_for(pg, "() => window.lowlabelAnnotate.state().pendingMask")
    assert pg.evaluate(f"window.lowlabelAnnotate.labelAt({CELL[0]}, {CELL[1]})") == 1
    pg.keyboard.press("n")  # the object is done: written into the label map
    clicked = np.array(pg.evaluate("window.lowlabelAnnotate.label()"), np.uint8).reshape(original.shape)
    changed = clicked != original
    assert changed[CELL[1], CELL[0]] and changed.sum() >= 20 and (clicked[changed] == 1).all()

    # undo takes back the object's end, then its click; redo brings both again
    at = f"window.lowlabelAnnotate.labelAt({CELL[0]}, {CELL[1]})"
    pg.keyboard.press("z")
    assert state(pg)["pending"] and pg.evaluate(at) == 1
    pg.keyboard.press("z")
    assert not state(pg)["pending"] and pg.evaluate(at) == 0
    pg.keyboard.press("y")
    pg.keyboard.press("y")
    assert not state(pg)["pending"] and pg.evaluate(at) == 1
    assert np.array_equal(np.array(pg.evaluate("window.lowlabelAnnotate.label()"), np.uint8).reshape(original.shape), clicked)

    # a brush stroke of class 1 (cell, id 0), 8 px wide, along row 30, with the whole image in view again
    pg.keyboard.press("0")
    pg.keyboard.press("1")
    pg.keyboard.press("b")
    pg.mouse.move(*page_xy(pg, *STROKE[0]))
    pg.mouse.down()
    for k in range(1, 11):
        x = STROKE[0][0] + (STROKE[1][0] - STROKE[0][0]) * k / 10
        pg.mouse.move(*page_xy(pg, x, STROKE[0][1]))
    pg.mouse.up()
    drawn = np.array(pg.evaluate("window.lowlabelAnnotate.label()"), np.uint8).reshape(original.shape)
    assert (drawn[STROKE[0][1], STROKE[0][0]: STROKE[1][0] + 1] == 0).all() and (drawn[28:33, 22:118] == 0).all()
    assert (drawn[STROKE[0][1] + 20] == original[STROKE[0][1] + 20]).all()  # nothing painted far from the stroke
    assert state(pg)["clicks"] == 1 and state(pg)["strokes"] == 1

    pg.screenshot(path=str(tmp_path / "annotate.png"))
    if os.environ.get("LOWLABEL_TEST_ARTEFACTS"):
        out = Path(os.environ["LOWLABEL_TEST_ARTEFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "annotate.png", out / "annotate.png")

    # accept (Enter): saved, and the page moves on to the next image
    pg.keyboard.press("Enter")
    wait_open(pg, "slice01")
    assert pg.locator("#progress").inner_text() == "1 of 20 done"
    saved = Image.open(dataset / "masks" / "slice00.png")
    assert saved.mode == "P" and np.array_equal(np.asarray(saved), drawn)  # exactly what the page drew
    assert (dataset / "splits" / "corrected.txt").read_text() == "slice00\n"
    assert validate_dataset(dataset).ok
    assert main(["validate", str(dataset), "--quiet"]) == 0

    # a reload shows the saved mask
    pg.goto(server + "#slice00")
    pg.reload()
    wait_open(pg, "slice00")
    assert state(pg)["source"] == "mask" and "slice00" in state(pg)["done"]
    shown = np.array(pg.evaluate("window.lowlabelAnnotate.label()"), np.uint8).reshape(original.shape)
    assert np.array_equal(shown, drawn)
    assert pg.locator("#saved-flag").inner_text() == "saved"
    assert pg.locator("#queue option[value='slice00']").inner_text() == "\u2713 slice00"
    pg.select_option("#queue", "slice03")  # the queue list jumps
    wait_open(pg, "slice03")
    assert pg.locator("#position").inner_text() == "4 / 20"


def test_points_without_a_segmenter_save_as_weak_labels(shared_datasets, tmp_path, page):
    dataset = tmp_path / "isbi2012-em"
    shutil.copytree(shared_datasets / "isbi2012-em", dataset)
    store, _, _, _ = open_session(dataset, segmenter="none", user="browser-test")
    box, ready = {}, threading.Event()
    t = threading.Thread(target=serve, args=(store,), kwargs={"port": 0, "on_ready": lambda u, s: (box.update(url=u, server=s), ready.set())}, daemon=True)
    t.start()
    assert ready.wait(30)
    try:
        pg = page
        pg.goto(box["url"])
        wait_open(pg, "slice00")
        pg.select_option("#source", "empty")
        wait_for(pg, "() => window.lowlabelAnnotate.state().source === 'empty'")
        pg.keyboard.press("p")
        pg.mouse.click(*page_xy(pg, *CELL))  # a point of class cell (id 0)
        pg.keyboard.press("2")
        pg.mouse.click(*page_xy(pg, 5, 5))  # a point of membrane (id 1)
        pg.keyboard.press("w")
        wait_for(pg, "() => document.getElementById('saved-flag').innerText === 'weak label saved'")
        weak = np.asarray(Image.open(dataset / "annotated" / "slice00.png"))
        expected = np.full(weak.shape, 255, np.uint8)
        expected[CELL[1], CELL[0]] = 0
        expected[5, 5] = 1
        assert np.array_equal(weak, expected)
        assert (dataset / "splits" / "corrected-weak.txt").read_text() == "slice00\n"
        assert validate_dataset(dataset).ok
    finally:
        box["server"].should_exit = True
        t.join(15)


def _serve(store, assistant=None, predictions=None):
    box, ready = {}, threading.Event()
    t = threading.Thread(target=serve, args=(store, assistant, predictions),
                         kwargs={"port": 0, "on_ready": lambda u, s: (box.update(url=u, server=s), ready.set())}, daemon=True)
    t.start()
    assert ready.wait(30), "the server did not start"
    return box, t


def test_a_run_prediction_and_its_uncertainty_on_the_page(tmp_path, page):
    from lowlabel import fit
    from lowlabel.config import load_config

    from .conftest import make_dataset, tiny_config

    data = make_dataset(tmp_path / "tiny", n=6, size=(48, 64))
    run = fit(load_config(raw=tiny_config(data, tmp_path / "runs", "supervised", "none", iterations=2)), progress=False)
    store, _, predictions, _ = open_session(data, run=run.run_dir, segmenter="none")
    box, t = _serve(store, None, predictions)
    try:
        pg = page
        pg.goto(box["url"])
        wait_open(pg, "img00")
        assert state(pg)["source"] == "prediction" and state(pg)["uncertainty"]
        shown = np.array(pg.evaluate("window.lowlabelAnnotate.label()"), np.uint8).reshape(48, 64)
        assert np.array_equal(shown, run.predict(data / "images" / "img00.png").labels)
        expected = predictions.get("img00", data / "images" / "img00.png")[1]
        assert pg.evaluate("window.lowlabelAnnotate.uncertaintyAt(10, 20)") == int(expected[20, 10])
        pg.keyboard.press("u")
        assert state(pg)["showUncertainty"]
        assert state(pg)["tool"] == "brush"  # no segmenter: the page starts with the brush
    finally:
        box["server"].should_exit = True
        t.join(15)


def test_a_page_of_another_origin_cannot_write(dataset, page, tmp_path):
    """A page the user has open on another site posts to the annotate server: a simple no-cors
    POST (no preflight) is sent with that site's Origin and no token, and refused (or blocked by
    the browser itself); one with the token header needs a preflight, which the server never
    grants; a cross-origin read is blocked. Nothing is written."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    store, _, _, _ = open_session(dataset, segmenter="none")
    box, t = _serve(store)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "index.html").write_text("<!doctype html><title>another site</title>")
    evil = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "evil")))
    et = threading.Thread(target=evil.serve_forever, daemon=True)
    et.start()
    before = (dataset / "masks" / "slice00.png").read_bytes()
    try:
        pg = page
        pg.goto(f"http://localhost:{evil.server_address[1]}/")
        url = box["url"] + "api/items/slice00/mask"
        outcome = pg.evaluate("""async (url) => {
            const png = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
            const out = {};
            try { const r = await fetch(url, {method: "POST", mode: "no-cors", body: png, headers: {"Content-Type": "text/plain"}}); out.simple = r.type; }
            catch (e) { out.simple = "error"; }
            try { const r = await fetch(url, {method: "POST", body: png, headers: {"Content-Type": "image/png", "X-Lowlabel-Token": "guess"}}); out.preflighted = r.status; }
            catch (e) { out.preflighted = "blocked"; }
            try { const r = await fetch(url.replace(/mask$/, ""), {mode: "cors"}); out.read = r.status; }
            catch (e) { out.read = "blocked"; }
            return out;
        }""", url)
        assert outcome["simple"] in ("opaque", "error")  # sent, its answer hidden from the page
        assert outcome["preflighted"] == "blocked" and outcome["read"] == "blocked", outcome
    finally:
        evil.shutdown()
        box["server"].should_exit = True
        t.join(15)
    assert (dataset / "masks" / "slice00.png").read_bytes() == before
    assert not (dataset / "splits" / "corrected.txt").exists() and not (dataset / "splits" / "corrected.log.json").exists()
