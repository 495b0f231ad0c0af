"""The web app of ``lowlabel annotate``: a FastAPI application over an
:class:`~lowlabel.annotate.store.AnnotationStore`, and :func:`serve`, which runs it with uvicorn.

Routes (``{sid}`` is an image id of the queue; anything else is 404):

    GET  /                                   the page (static/index.html, the session token in it)
    GET  /static/annotate.js|annotate.css    its script and style
    GET  /api/session                        dataset, classes, palette, queue, what is saved, segmenter
    GET  /api/items/{sid}                    size, label sources, whether it is saved
    GET  /api/items/{sid}/image              the image as PNG
    GET  /api/items/{sid}/labels/{source}    a label map as 8-bit PNG: mask, weak:<name>, prediction
    GET  /api/items/{sid}/uncertainty        the run's uncertainty, 8-bit PNG (0 certain .. 255)
    POST /api/items/{sid}/embed              encode the image now (so the first click is quick)
    POST /api/items/{sid}/segment            JSON {"points": [[x, y, 1|0], ...], "box": [x0, y0, x1, y1] | null}
                                             -> 8-bit PNG, 1 inside the object; X-Score, X-Seconds headers
    POST /api/items/{sid}/mask?clicks=&strokes=&seconds=   body: the label map PNG -> the log entry
    POST /api/items/{sid}/weak?...           the same, saved as a weak label map

Safety: every request's ``Host`` must be one the server was started for (a DNS-rebinding page
cannot reach it under its own name); every POST must carry the session token in
``X-Lowlabel-Token`` (only a page served by this server knows it: a cross-origin page cannot read
it, nor send that header without a CORS preflight this app never answers), and when the browser
sends ``Origin`` or ``Sec-Fetch-Site`` they must say the request comes from this origin. Bodies
are capped (``Content-Length`` and the bytes actually read).
"""

from __future__ import annotations

import io
import ipaddress
import json
import math
import secrets
import socket
import sys
import threading
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from .assist import _Recent
from .store import AnnotationStore, RequestError

MAX_JSON = 64 * 1024  # a segment request: a few hundred points at most
MAX_POINTS = 500
STATIC = {"annotate.js": "text/javascript; charset=utf-8", "annotate.css": "text/css; charset=utf-8"}
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _static(name: str) -> str:
    return resources.files("lowlabel.annotate").joinpath("static", name).read_text(encoding="utf-8")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> set[str]:
    """The ``Host`` header values a browser sends for this server: ``name:port`` for the bound
    host and the loopback names (and, for a wildcard bind, this machine's names), plus ``extra``."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    if host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname(), socket.getfqdn()}
    elif not is_loopback(host):
        names.add(f"[{host}]" if ":" in host else host)
    names |= {f"[{h}]" if ":" in h and not h.startswith("[") else h for h in extra}
    return {f"{n}:{port}".lower() for n in names} | ({n.lower() for n in names} if port == 80 else set())


def create_app(store: AnnotationStore, assistant=None, predictions=None, *, hosts: set[str], token: str | None = None,
               max_body: int | None = None):
    """The FastAPI app. ``hosts``: accepted ``Host`` values (``name:port``, lower case);
    ``token``: the session token POSTs must carry (random when None); ``max_body``: the largest
    body accepted (default: an uncompressed label map of the largest queued image + 1 MiB)."""
    token = token or secrets.token_urlsafe(24)
    origins = {f"http://{h}" for h in hosts}
    app = FastAPI(title="lowlabel annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token = token
    sizes: dict[str, tuple[int, int]] = {}
    recent = _Recent(2)  # decoded images: each click of a session reads its image once, not per click
    recent_lock = threading.Lock()

    def pixels(sid: str) -> np.ndarray:
        with recent_lock:
            arr = recent.get(sid)
        if arr is None:
            arr = store.image(sid)
            with recent_lock:
                recent.put(sid, arr)
        return arr

    def size(sid: str) -> tuple[int, int]:
        if sid not in sizes:
            sizes[sid] = store.size(sid)
        return sizes[sid]

    if max_body is None:
        largest = max(h * w for h, w in (size(s) for s in store.order))
        max_body = largest + (1 << 20)
    app.state.max_body = max_body

    def refuse(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = (request.headers.get("host") or "").lower()
        if host not in hosts:
            return refuse(421, "this server answers only to the host names it was started for")
        if request.method in UNSAFE:
            origin = request.headers.get("origin")
            if origin is not None and origin.lower() not in origins:
                return refuse(403, "cross-origin write refused")
            site = request.headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return refuse(403, "cross-site write refused")
            if not secrets.compare_digest(request.headers.get("x-lowlabel-token", ""), token):
                return refuse(403, "missing or wrong session token")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_body):
                return refuse(413, f"body larger than {max_body} bytes")
        try:
            response = await call_next(request)
        except RequestError as err:
            return refuse(err.status, str(err))
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return refuse(err.status, str(err))

    async def body(request: Request, limit: int) -> bytes:
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise RequestError(413, f"body larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def count(request: Request, name: str, kind=int):
        raw = request.query_params.get(name, "0")
        try:
            v = kind(raw)
        except ValueError:
            raise RequestError(422, f"{name}={raw!r}: not a number") from None
        if not math.isfinite(v) or v < 0 or v > 10**7:
            raise RequestError(422, f"{name}={raw!r}: out of range")
        return v

    @app.get("/", response_class=HTMLResponse)
    def page():
        html = _static("index.html").replace("{{TOKEN}}", token).replace("{{TITLE}}", _escape(store.info.name))
        return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'"})

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            raise RequestError(404, "no such file")
        return Response(_static(name), media_type=STATIC[name])

    @app.get("/api/session")
    def session():
        done = set(store.corrected())
        weak = set(store.corrected(weak=True))
        return {
            "dataset": store.info.name, "classes": list(store.info.classes), "palette": [list(c) for c in store.info.palette],
            "queue": store.order, "done": [i for i in store.order if i in done], "done_weak": [i for i in store.order if i in weak],
            "user": store.user, "segmenter": None if assistant is None else assistant.name,
            "random_weights": bool(assistant is not None and assistant.random_weights), "run": predictions is not None,
        }

    @app.get("/api/items/{sid}")
    def item(sid: str):
        sid = store.resolve(sid)
        h, w = size(sid)
        sources = list(store.label_sources(sid))
        if predictions is not None:
            sources.append("prediction")
        return {"id": sid, "index": store.order.index(sid), "width": w, "height": h, "sources": sources,
                "uncertainty": predictions is not None, "saved": sid in set(store.corrected()), "saved_weak": sid in set(store.corrected(weak=True))}

    @app.get("/api/items/{sid}/image")
    def image(sid: str):
        return Response(_png(pixels(sid)), media_type="image/png")

    @app.get("/api/items/{sid}/labels/{source}")
    def labels(sid: str, source: str):
        sid = store.resolve(sid)
        if source == "prediction":
            if predictions is None:
                raise RequestError(404, "no run: start with --run RUN to see its predictions")
            arr = predictions.get(sid, store.items[sid].image)[0]
        else:
            arr = store.read_source(sid, source)
        return Response(_png(arr.astype(np.uint8)), media_type="image/png")

    @app.get("/api/items/{sid}/uncertainty")
    def uncertainty(sid: str):
        sid = store.resolve(sid)
        if predictions is None:
            raise RequestError(404, "no run: start with --run RUN to see its uncertainty")
        return Response(_png(predictions.get(sid, store.items[sid].image)[1]), media_type="image/png")

    @app.post("/api/items/{sid}/embed")
    def embed(sid: str):
        sid = store.resolve(sid)
        if assistant is None:
            raise RequestError(404, "no segmenter")
        import time

        t0 = time.perf_counter()
        assistant.embedding(sid, pixels(sid))
        return {"seconds": round(time.perf_counter() - t0, 4)}

    @app.post("/api/items/{sid}/segment")
    async def segment(sid: str, request: Request):
        sid = store.resolve(sid)
        if assistant is None:
            raise RequestError(404, "no segmenter")
        try:
            req = json.loads(await body(request, MAX_JSON))
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not JSON") from None
        h, w = size(sid)
        points, box = _prompt(req, w, h)
        mask, score, seconds = await run_in_threadpool(lambda: assistant.segment(sid, pixels(sid), points, box))
        return Response(_png(mask.astype(np.uint8)), media_type="image/png", headers={"X-Score": f"{score:.4f}", "X-Seconds": f"{seconds:.4f}"})

    async def save(sid: str, request: Request, weak: bool):
        sid = store.resolve(sid)
        if (request.headers.get("content-type") or "").split(";")[0].strip().lower() not in ("image/png", "application/octet-stream"):
            raise RequestError(415, "send the label map as image/png")
        h, w = size(sid)
        raw = await body(request, min(max_body, h * w + (1 << 20)))
        clicks, strokes, seconds = count(request, "clicks"), count(request, "strokes"), count(request, "seconds", float)

        def work():
            arr = store.decode_label_png(sid, raw)
            return store.save(sid, arr, weak=weak, clicks=clicks, strokes=strokes, seconds=seconds,
                              segmenter=None if assistant is None else assistant.name)

        entry = await run_in_threadpool(work)
        return {"saved": entry, "done": len(set(store.corrected()) & set(store.order)), "total": len(store.order)}

    @app.post("/api/items/{sid}/mask")
    async def save_mask(sid: str, request: Request):
        return await save(sid, request, weak=False)

    @app.post("/api/items/{sid}/weak")
    async def save_weak(sid: str, request: Request):
        return await save(sid, request, weak=True)

    return app


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _prompt(req, w: int, h: int) -> tuple[list[tuple[float, float, int]], list[float] | None]:
    """Checked points (x, y, label) and box from a segment request's JSON."""
    if not isinstance(req, dict):
        raise RequestError(422, "give a JSON object with points and box")
    raw_points = req.get("points") or []
    if not isinstance(raw_points, list) or len(raw_points) > MAX_POINTS:
        raise RequestError(422, f"points: a list of at most {MAX_POINTS} [x, y, 1|0]")
    points = []
    for p in raw_points:
        if not (isinstance(p, list) and len(p) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)):
            raise RequestError(422, "each point is [x, y, 1|0]")
        x, y, lab = float(p[0]), float(p[1]), p[2]
        if not (0 <= x < w and 0 <= y < h) or lab not in (0, 1):
            raise RequestError(422, f"point {p} outside the {w}x{h} image or with a label other than 1 / 0")
        points.append((x, y, int(lab)))
    box = req.get("box")
    if box is not None:
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise RequestError(422, "box is [x0, y0, x1, y1]")
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = sorted((min(max(x0, 0), w), min(max(x1, 0), w)))
        y0, y1 = sorted((min(max(y0, 0), h), min(max(y1, 0), h)))
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise RequestError(422, "the box is empty")
        box = [x0, y0, x1, y1]
    if not points and box is None:
        raise RequestError(422, "a prompt needs a point or a box")
    return points, box


def serve(store: AnnotationStore, assistant=None, predictions=None, *, host: str = "127.0.0.1", port: int = 8765,
          extra_hosts: tuple[str, ...] = (), on_ready=None, log_level: str = "warning") -> None:
    """Bind ``host:port`` (port 0: any free port), print where the page is, serve until
    interrupted. ``on_ready(url, server)`` is called once the socket is bound (tests stop the
    server through ``server.should_exit``)."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
    sock.listen(64)
    port = sock.getsockname()[1]
    app = create_app(store, assistant, predictions, hosts=allowed_hosts(host, port, extra_hosts))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") or is_loopback(host) else host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
    if not is_loopback(host):
        print(f"warning: serving on {host}, not only on this machine: anyone who can reach port {port} can open the page, "
              "see these images and write masks into the dataset. Use --host 127.0.0.1 unless you need this.", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off"))
    if on_ready is not None:
        on_ready(url, server)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["allowed_hosts", "create_app", "is_loopback", "serve"]
