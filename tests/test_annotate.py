"""``lowlabel annotate``'s server: what it accepts, what it refuses, what it writes.

FastAPI's TestClient against a tiny generated dataset (48 x 64, 3 classes); the real-browser
tests are in test_annotate_browser.py."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the annotate extra (fastapi) is not installed: pip install 'lowlabel[annotate]'")
try:
    from starlette.testclient import TestClient
except (ImportError, RuntimeError):  # it needs httpx
    pytest.skip("starlette's TestClient needs httpx: pip install 'lowlabel[annotate]'", allow_module_level=True)

from lowlabel.annotate import open_session  # noqa: E402
from lowlabel.annotate.app import allowed_hosts, create_app, is_loopback, serve  # noqa: E402
from lowlabel.annotate.store import AnnotationStore, queue_ids  # noqa: E402
from lowlabel.cli import build_parser, main  # noqa: E402
from lowlabel.data.dataset import FolderDataset, read_ids  # noqa: E402
from lowlabel.data.validate import validate_dataset  # noqa: E402

from .conftest import make_dataset, tiny_config  # noqa: E402

H, W = 48, 64
TOKEN = "test-token"
BASE = "http://127.0.0.1:8765"
AUTH = {"X-Lowlabel-Token": TOKEN}


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    img.save(buf, format="PNG")
    return buf.getvalue()


def mask_of(value: int) -> np.ndarray:
    m = np.full((H, W), value, np.uint8)
    m[:, : W // 4] = 2
    m[0, :] = 255
    return m


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "ds", n=6, size=(H, W))


@pytest.fixture
def session(data):
    store, assistant, predictions, _ = open_session(data, cache=None, user="tester")
    return store, assistant


@pytest.fixture
def client(session):
    store, assistant = session
    app = create_app(store, assistant, hosts=allowed_hosts("127.0.0.1", 8765), token=TOKEN)
    with TestClient(app, base_url=BASE) as c:
        yield c


def post_mask(client, sid, body, kind="mask", headers=None, **query):
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return client.post(f"/api/items/{sid}/{kind}" + (f"?{q}" if q else ""), content=body,
                       headers={**AUTH, "Content-Type": "image/png", **(headers or {})})


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- reading ----------------------------------------------------------------------------------
def test_page_session_and_item(client, data):
    page = client.get("/")
    assert page.status_code == 200 and TOKEN in page.text and "annotate.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/annotate.js").status_code == 200 and client.get("/static/annotate.css").status_code == 200
    assert client.get("/static/index.html").status_code == 404  # only the two named files
    s = client.get("/api/session").json()
    assert s["queue"] == read_ids(data / "splits" / "train.txt") and s["done"] == [] and s["classes"] == ["a", "b", "c"]
    assert len(s["palette"]) == 3 and s["segmenter"] == "classical" and s["user"] == "tester"
    it = client.get("/api/items/img01").json()
    assert (it["width"], it["height"], it["sources"], it["saved"]) == (W, H, ["mask"], False)
    img = np.asarray(Image.open(io.BytesIO(client.get("/api/items/img01/image").content)))
    assert img.shape == (H, W, 3)
    lab = np.asarray(Image.open(io.BytesIO(client.get("/api/items/img01/labels/mask").content)))
    assert np.array_equal(lab, np.asarray(Image.open(data / "masks" / "img01.png")))
    assert client.get("/api/items/img01/labels/weak:none").status_code == 404
    assert client.get("/api/items/img01/uncertainty").status_code == 404  # no --run


def test_segment_answers_a_click_and_checks_the_prompt(client):
    r = client.post("/api/items/img01/segment", json={"points": [[W - 5, 5, 1]], "box": None}, headers=AUTH)
    assert r.status_code == 200, r.text
    m = np.asarray(Image.open(io.BytesIO(r.content)))
    assert m.shape == (H, W) and m[5, W - 5] == 1 and set(np.unique(m)) <= {0, 1}
    assert m[:, W // 2 :].mean() > m[:, : W // 2].mean()  # the right half is class b, one colour
    assert float(r.headers["X-Score"]) >= 0
    box = client.post("/api/items/img01/segment", json={"points": [], "box": [W // 2, 0, W, H]}, headers=AUTH)
    assert box.status_code == 200
    for bad in ({"points": [[W + 3, 5, 1]]}, {"points": [[5, 5, 2]]}, {"points": [[5, 5]]}, {"points": [["5", 5, 1]]},
                {"points": [[5, 5, True]]}, {"points": []}, {"box": [3, 3, 3, 3]}, {"points": [[1, 1, 1]] * 501}, [1, 2]):
        assert client.post("/api/items/img01/segment", json=bad, headers=AUTH).status_code == 422, bad
    assert client.post("/api/items/img01/segment", content=b"{not json", headers=AUTH).status_code == 400
    assert client.post("/api/items/img01/segment", content=b"x" * (64 * 1024 + 1), headers=AUTH).status_code == 413


# -- the bad inputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("get", "/api/items/{}"), ("get", "/api/items/{}/image"), ("get", "/api/items/{}/labels/mask"),
                                         ("post", "/api/items/{}/segment"), ("post", "/api/items/{}/mask"), ("post", "/api/items/{}/weak")])
def test_unknown_ids_are_404(client, data, method, path):
    before = tree(data)
    for sid in ("nope", "img04", "img05"):  # img04 / img05: images of val / test, not in the queue
        kw = {"headers": AUTH}
        if path.endswith("segment"):
            kw["json"] = {"points": [[1, 1, 1]]}
        elif method == "post":
            kw = {"headers": {**AUTH, "Content-Type": "image/png"}, "content": png(mask_of(1))}
        r = getattr(client, method)(path.format(sid), **kw)
        assert r.status_code == 404, (sid, r.text)
    assert tree(data) == before


PATH_LIKE = ["../ds/masks/img01", "..%2Fds%2Fmasks%2Fimg01", "%2e%2e", "..", ".", "img01.png", "masks%2Fimg01", "%2Fetc%2Fpasswd",
             "img01%00", "img01%2F..%2Fimg02", "~root", "img01%20", "IMG01", "%252e%252e%252fimg01"]


@pytest.mark.parametrize("sid", PATH_LIKE)
def test_path_like_ids_never_reach_a_file(client, data, sid):
    before = tree(data)
    outside = tree(data.parent)
    for url in (f"/api/items/{sid}", f"/api/items/{sid}/image", f"/api/items/{sid}/labels/mask"):
        r = client.get(url)
        assert r.status_code in (404, 405), (url, r.status_code)  # 405: a client folded "." into another route
    r = post_mask(client, sid, png(mask_of(1)))
    assert r.status_code in (404, 405), (sid, r.status_code)
    assert tree(data) == before and tree(data.parent) == outside


def test_label_source_names_are_not_paths(client):
    for source in ("../masks", "mask%2F..%2F..%2Fdataset.json", "weak:..", "images", "masks"):
        assert client.get(f"/api/items/img01/labels/{source}").status_code == 404, source


def test_wrong_mask_size_is_refused(client, data):
    before = (data / "masks" / "img01.png").read_bytes()
    for shape in ((H, W + 1), (H - 1, W), (W, H), (1, 1)):
        r = post_mask(client, "img01", png(np.zeros(shape, np.uint8)))
        assert r.status_code == 422 and "mask is" in r.json()["error"], shape
    assert (data / "masks" / "img01.png").read_bytes() == before
    assert not (data / "splits" / "corrected.txt").exists()


def test_non_png_bodies_are_refused(client, data):
    before = tree(data)
    jpeg = io.BytesIO()
    Image.fromarray(mask_of(1)).save(jpeg, format="JPEG")
    good = png(mask_of(1))
    for body in (b"", b"hello", jpeg.getvalue(), good[:8] + b"garbage" * 10, good[: len(good) // 2],
                 b"GIF89a" + good, json.dumps({"mask": [[0]]}).encode()):
        r = post_mask(client, "img01", body)
        assert r.status_code == 415, (body[:12], r.status_code, r.text)
    for arr, mode in ((np.zeros((H, W, 3), np.uint8), None), (np.zeros((H, W), np.uint16), None), (mask_of(1), "1"), (mask_of(1), "RGBA")):
        r = post_mask(client, "img01", png(arr, mode))
        assert r.status_code == 422 and "mode" in r.json()["error"], mode
    r = client.post("/api/items/img01/mask", content=good, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 415
    assert tree(data) == before


def test_class_values_out_of_range_are_refused(client, data):
    for v in (3, 4, 100, 254):
        m = mask_of(1)
        m[10, 10] = v
        r = post_mask(client, "img01", png(m))
        assert r.status_code == 422 and f"[{v}]" in r.json()["error"], v
    assert not (data / "splits" / "corrected.txt").exists()
    m = mask_of(1)  # 0..2 and 255 (unlabeled) are fine
    assert post_mask(client, "img01", png(m)).status_code == 200


def test_a_palette_png_is_read_as_indices(client, data):
    m = mask_of(2)
    img = Image.frombytes("P", (W, H), m.tobytes())
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert post_mask(client, "img02", buf.getvalue()).status_code == 200
    assert np.array_equal(np.asarray(Image.open(data / "masks" / "img02.png")), m)


def test_oversized_bodies_are_refused(client, data):
    r = post_mask(client, "img01", b"\x89PNG\r\n\x1a\n" + b"\0" * (H * W + (1 << 20)))
    assert r.status_code == 413
    big = png(np.random.default_rng(0).integers(0, 255, (H * 40, W * 40), dtype=np.uint8))  # a large PNG of the wrong size
    assert post_mask(client, "img01", big).status_code in (413, 422)
    assert not (data / "splits" / "corrected.txt").exists()


def test_concurrent_saves_of_one_id_last_wins_never_torn(client, data):
    masks = [mask_of(v % 3) for v in range(12)]
    for k, m in enumerate(masks):
        m[5 + k, 5:9] = (k + 1) % 3  # every body differs
    bodies = [png(m) for m in masks]
    dest = data / "masks" / "img03.png"
    seen, stop, errors = [], threading.Event(), []

    def read_loop():
        while not stop.is_set():
            if dest.exists():
                try:
                    seen.append(np.asarray(Image.open(dest)).copy())
                except Exception as err:  # noqa: BLE001  (a torn file is what this test looks for)
                    errors.append(err)

    def save(k):
        r = post_mask(client, "img03", bodies[k], clicks=k)
        if r.status_code != 200:
            errors.append(r.text)

    reader = threading.Thread(target=read_loop)
    reader.start()
    threads = [threading.Thread(target=save, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert not errors, errors[:3]
    final = np.asarray(Image.open(dest))
    log = json.loads((data / "splits" / "corrected.log.json").read_text())["saves"]
    assert len(log) == len(bodies) and sorted(e["clicks"] for e in log) == list(range(len(bodies)))
    last = log[-1]["clicks"]  # the last save recorded is the file on disk
    assert np.array_equal(final, masks[last])
    assert all(any(np.array_equal(s, m) for m in masks) or np.array_equal(s, np.asarray(Image.open(data / "annotate" / "replaced" / "masks" / "img03.png")))
               for s in seen)
    assert read_ids(data / "splits" / "corrected.txt") == ["img03"]
    assert not [p for p in data.rglob("*.tmp")]


# -- the request's origin -----------------------------------------------------------------------
def test_host_and_origin_checks(session, data):
    store, assistant = session
    app = create_app(store, assistant, hosts=allowed_hosts("127.0.0.1", 8765), token=TOKEN)
    body = png(mask_of(1))
    with TestClient(app, base_url="http://evil.example:8765") as c:  # DNS rebinding: another name for this address
        assert c.get("/").status_code == 421 and c.get("/api/session").status_code == 421
        assert post_mask(c, "img01", body).status_code == 421
    with TestClient(app, base_url="http://127.0.0.1:9999") as c:  # another port
        assert c.get("/api/session").status_code == 421
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/", headers={"Origin": "http://evil.example"}).status_code == 200  # reading the page is harmless; the token stays in it
        assert post_mask(c, "img01", body, headers={"Origin": "http://evil.example"}).status_code == 403
        assert post_mask(c, "img01", body, headers={"Origin": "null"}).status_code == 403
        assert post_mask(c, "img01", body, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert post_mask(c, "img01", body, headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
        assert c.post("/api/items/img01/mask", content=body, headers={"Content-Type": "image/png"}).status_code == 403
        assert post_mask(c, "img01", body, headers={"X-Lowlabel-Token": "wrong"}).status_code == 403
        assert c.post("/api/items/img01/segment", json={"points": [[1, 1, 1]]}).status_code == 403
        assert not (data / "splits" / "corrected.txt").exists()
        ok = post_mask(c, "img01", body, headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"})
        assert ok.status_code == 200
    with TestClient(app, base_url="http://localhost:8765") as c:
        assert c.get("/api/session").status_code == 200


def test_allowed_hosts_and_loopback():
    assert allowed_hosts("127.0.0.1", 8765) == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert "10.0.0.5:80" in allowed_hosts("10.0.0.5", 80) and "10.0.0.5" in allowed_hosts("10.0.0.5", 80)
    assert "box.lan:8765" in allowed_hosts("127.0.0.1", 8765, ("box.lan",))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.5.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")
    assert build_parser().parse_args(["annotate", "d"]).host == "127.0.0.1"


def _serve_in_thread(store, host, port=0):
    box = {}
    ready = threading.Event()

    def on_ready(url, server):
        box["url"], box["server"] = url, server
        ready.set()

    t = threading.Thread(target=serve, args=(store,), kwargs={"host": host, "port": port, "on_ready": on_ready}, daemon=True)
    t.start()
    assert ready.wait(30)
    return box, t


def test_serve_binds_loopback_and_answers(session, capsys):
    store, _ = session
    box, t = _serve_in_thread(store, "127.0.0.1")
    try:
        url = box["url"]
        assert url.startswith("http://127.0.0.1:")
        for _ in range(100):
            try:
                with urllib.request.urlopen(url + "api/session", timeout=5) as r:
                    assert json.loads(r.read())["queue"][0] == "img00"
                break
            except urllib.error.URLError:
                threading.Event().wait(0.05)
        else:
            pytest.fail("the server did not answer")
        req = urllib.request.Request(url + "api/items/img00/mask", data=png(mask_of(1)), method="POST", headers={"Content-Type": "image/png"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 403  # no token
    finally:
        box["server"].should_exit = True
        t.join(10)
    assert "warning" not in capsys.readouterr().err


def test_serve_warns_for_another_host(session, capsys):
    store, _ = session
    box, t = _serve_in_thread(store, "0.0.0.0")
    box["server"].should_exit = True
    t.join(10)
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err and "--host 127.0.0.1" in err


# -- the queue --------------------------------------------------------------------------------
def test_queue_files(data, tmp_path):
    (tmp_path / "next.txt").write_text("img02\nimg00\nimg02\n# comment\n")
    store, *_ = open_session(data, queue=tmp_path / "next.txt", segmenter="none")
    assert store.order == ["img02", "img00"]
    (tmp_path / "next.images.txt").write_text("img01\nimg03\n")  # suggest --group-by: the images of the cases
    assert queue_ids(tmp_path / "next.txt") == ["img01", "img03"]
    (tmp_path / "win.txt").write_text("img03@32,0,32,32\nimg01@0,0,32,32\nimg03@0,0,32,32\n")  # suggest --tile: windows
    assert queue_ids(tmp_path / "win.txt") == ["img03", "img01"]
    (data / "splits" / "unlabeled.txt").write_text("img03\n")
    assert open_session(data, segmenter="none")[0].order == ["img03"]
    (tmp_path / "bad.txt").write_text("img00\nimg05\n")  # img05 is a test image
    with pytest.raises(ValueError, match="val or test"):
        open_session(data, queue=tmp_path / "bad.txt", segmenter="none")
    (tmp_path / "bad.txt").write_text("img00\nghost\n")
    with pytest.raises(ValueError, match="no image"):
        open_session(data, queue=tmp_path / "bad.txt", segmenter="none")
    with pytest.raises(ValueError, match="random"):
        open_session(data, segmenter="mobilesam")  # no checkpoint: random weights refused


def test_refuses_a_masks_folder_outside_the_dataset(tmp_path):
    data = make_dataset(tmp_path / "ds", n=6, size=(H, W))
    (data / "masks").rename(tmp_path / "elsewhere")
    (data / "masks").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match="outside the dataset"):
        AnnotationStore(data, ["img00"])


def test_a_linked_mask_is_replaced_not_its_target(tmp_path):
    src = make_dataset(tmp_path / "src", n=6, size=(H, W))
    data = make_dataset(tmp_path / "ds", n=6, size=(H, W))
    (data / "masks" / "img01.png").unlink()
    (data / "masks" / "img01.png").symlink_to(src / "masks" / "img01.png")  # as `weaken` links the other splits' masks
    original = (src / "masks" / "img01.png").read_bytes()
    store = AnnotationStore(data, ["img01"])
    store.save("img01", mask_of(0))
    assert (src / "masks" / "img01.png").read_bytes() == original
    assert not (data / "masks" / "img01.png").is_symlink()
    assert np.array_equal(np.asarray(Image.open(data / "masks" / "img01.png")), mask_of(0))


# -- what is written, and the next fit ------------------------------------------------------------
def test_save_writes_mask_split_log_and_keeps_the_old_mask(client, data):
    old = (data / "masks" / "img01.png").read_bytes()
    m = mask_of(1)
    r = post_mask(client, "img01", png(m), clicks=3, strokes=2, seconds=12.5)
    assert r.status_code == 200 and r.json()["done"] == 1 and r.json()["total"] == 4
    saved = Image.open(data / "masks" / "img01.png")
    assert saved.mode == "P" and np.array_equal(np.asarray(saved), m)
    assert (data / "annotate" / "replaced" / "masks" / "img01.png").read_bytes() == old
    post_mask(client, "img01", png(mask_of(0)))
    assert (data / "annotate" / "replaced" / "masks" / "img01.png").read_bytes() == old  # the first original, kept once
    assert read_ids(data / "splits" / "corrected.txt") == ["img01"]
    entry = json.loads((data / "splits" / "corrected.log.json").read_text())["saves"][0]
    assert {k: entry[k] for k in ("id", "kind", "user", "clicks", "strokes", "seconds", "segmenter")} == \
        {"id": "img01", "kind": "mask", "user": "tester", "clicks": 3, "strokes": 2, "seconds": 12.5, "segmenter": "classical"}
    assert entry["labeled_pixels"] == H * W - W
    for bad in ("clicks=-1", "clicks=x", "seconds=nan", "seconds=inf"):
        r = client.post(f"/api/items/img01/mask?{bad}", content=png(m), headers={**AUTH, "Content-Type": "image/png"})
        assert r.status_code == 422, bad
    assert client.get("/api/session").json()["done"] == ["img01"]
    assert validate_dataset(data).ok


def test_corrected_masks_train_in_the_next_fit(client, data, tmp_path):
    from lowlabel import fit
    from lowlabel.config import load_config

    saved = {sid: mask_of(k) for k, sid in enumerate(("img00", "img02"))}
    for sid, m in saved.items():
        assert post_mask(client, sid, png(m)).status_code == 200
    corrected = data / "splits" / "corrected.txt"
    raw = tiny_config(data, tmp_path / "runs", "supervised", "none", iterations=2)
    raw["data"]["labeled"] = str(corrected)
    run = fit(load_config(raw=raw), progress=False)
    assert read_ids(run.run_dir / "splits" / "labeled.txt") == ["img00", "img02"]
    ds = FolderDataset(data, read_ids(corrected))  # what the trainer reads for them: the corrected masks
    for k, sid in enumerate(ds.ids):
        assert np.array_equal(ds.load(k)["mask"], saved[sid])

    # that run's prediction and uncertainty on the page (--run)
    store, assistant, predictions, _ = open_session(data, run=run.run_dir, segmenter="none")
    app = create_app(store, assistant, predictions, hosts=allowed_hosts("127.0.0.1", 8765), token=TOKEN)
    with TestClient(app, base_url=BASE) as c:
        it = c.get("/api/items/img01").json()
        assert it["sources"] == ["mask", "prediction"] and it["uncertainty"] and c.get("/api/session").json()["run"]
        pred = np.asarray(Image.open(io.BytesIO(c.get("/api/items/img01/labels/prediction").content)))
        expected = run.predict(data / "images" / "img01.png").labels
        assert pred.shape == (H, W) and np.array_equal(pred, expected)
        unc = np.asarray(Image.open(io.BytesIO(c.get("/api/items/img01/uncertainty").content)))
        assert unc.shape == (H, W) and unc.dtype == np.uint8 and unc.max() > 0
        assert c.post("/api/items/img01/segment", json={"points": [[1, 1, 1]]}, headers=AUTH).status_code == 404  # --segmenter none


def test_weak_labels_are_saved_in_the_weak_format_and_train(client, data, tmp_path):
    from lowlabel import fit
    from lowlabel.config import load_config

    weak = np.full((H, W), 255, np.uint8)
    weak[10, 10] = 0
    weak[20, 40:50] = 1  # a scribble
    r = post_mask(client, "img01", png(weak), kind="weak", clicks=1, strokes=1)
    assert r.status_code == 200 and r.json()["saved"]["kind"] == "weak"
    assert np.array_equal(np.asarray(Image.open(data / "annotated" / "img01.png")), weak)
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["weak_labels"] == {"annotated": "annotated/"} and meta["classes"] == ["a", "b", "c"]
    assert read_ids(data / "splits" / "corrected-weak.txt") == ["img01"]
    assert not (data / "splits" / "corrected.txt").exists()
    assert client.get("/api/items/img01").json()["sources"] == ["mask", "weak:annotated"]
    assert validate_dataset(data).ok
    raw = tiny_config(data, tmp_path / "runs", "supervised", "none", iterations=2)
    raw["data"].update(labeled=str(data / "splits" / "corrected-weak.txt"), weak="annotated")
    run = fit(load_config(raw=raw), progress=False)
    assert read_ids(run.run_dir / "splits" / "labeled.txt") == ["img01"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["annotate", str(tmp_path / "missing")]) == 2
    assert "lowlabel annotate: error:" in capsys.readouterr().err
    data = make_dataset(tmp_path / "ds", n=6, size=(H, W))
    assert main(["annotate", str(data), "--segmenter", "sam"]) == 2
    assert "random" in capsys.readouterr().err
    assert main(["annotate", str(data), "--port", "70000"]) == 2


def test_the_command_serves_until_interrupted(data):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lowlabel.cli", "annotate", str(data), "--port", "0", "--segmenter", "none", "--user", "cli"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("lowlabel annotate: http://127.0.0.1:"), (first, proc.stderr.read() if proc.poll() is not None else "")
        url = first.split()[-1]
        assert "4 image(s) from" in proc.stdout.readline()
        with urllib.request.urlopen(url + "api/session", timeout=10) as r:
            s = json.loads(r.read())
        assert s["user"] == "cli" and s["segmenter"] is None
        with urllib.request.urlopen(url, timeout=10) as r:
            assert "lowlabel-token" in r.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
    assert rc in (0, 130), proc.stderr.read()  # 130: uvicorn hands the interrupt on, and lowlabel reports it as Ctrl+C


def test_a_sam_family_segmenter_answers_from_the_embedding_cache(data, tmp_path):
    """MobileSAM with random weights (its masks mean nothing; the path is what is tested): the
    page's click goes through the project's backend, and a second session reads the embedding
    from the disk cache instead of encoding again."""
    pytest.importorskip("segment_anything")
    from lowlabel.annotate.assist import Assistant

    cache = tmp_path / "emb"
    store, assistant, _, _ = open_session(data, segmenter="mobilesam", allow_random_weights=True, cache=cache)
    assert assistant.random_weights and assistant.name == "mobilesam_vit_t"
    app = create_app(store, assistant, hosts=allowed_hosts("127.0.0.1", 8765), token=TOKEN)
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/api/session").json()["random_weights"] is True
        assert c.post("/api/items/img01/embed", headers=AUTH).status_code == 200
        r = c.post("/api/items/img01/segment", json={"points": [[10, 10, 1], [50, 30, 0]], "box": [2, 2, 40, 40]}, headers=AUTH)
        assert r.status_code == 200 and np.asarray(Image.open(io.BytesIO(r.content))).shape == (H, W)
    assert assistant.cache.misses == 1 and len(list(cache.rglob("*.pt"))) == 1
    again = Assistant("mobilesam", allow_random_weights=True, cache=cache)
    mask, score, _ = again.segment("img01", store.image("img01"), [(10.0, 10.0, 1)], None)
    assert again.cache.hits == 1 and again.cache.misses == 0 and mask.shape == (H, W)
