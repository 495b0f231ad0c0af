// lowlabel annotate: the page. Plain JavaScript, one canvas, no build step.
//
// State of the open image: `label` (Uint8Array, one class id per pixel, 255 = unlabeled) and the
// object being clicked (`pending`: its prompts and the segmenter's mask for them, drawn on top and
// written into `label` when it is finished). Arrays in the history are never changed in place: an
// edit copies `label` first, so undo / redo swap references.
"use strict";
(() => {
  const TOKEN = document.querySelector('meta[name="lowlabel-token"]').content;
  const UNLABELED = 255;
  const HISTORY = 40;
  const $ = (id) => document.getElementById(id);
  const view = $("view");
  const ctx = view.getContext("2d");
  const overlay = document.createElement("canvas");
  const octx = overlay.getContext("2d");

  const S = {
    session: null, classes: [], palette: [], queue: [], done: new Set(), doneWeak: new Set(),
    cls: 0, tool: "click", brush: 8, opacity: 0.5, showOverlay: true, showUncertainty: false,
    item: null, image: null, uncertainty: null, label: null, base: null, sources: [], source: null,
    pending: null, undo: [], redo: [], clicks: 0, strokes: 0, opened: 0, painting: null, dragBox: null,
    busy: false, segSeq: 0, weakPoints: [], zoom: 1, pan: [0, 0], panning: null,
  };

  // ---- small helpers ------------------------------------------------------------------------
  function status(text, error) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", !!error);
  }
  async function api(path, opts = {}) {
    const init = { ...opts, headers: { ...(opts.headers || {}) } };
    if (init.method && init.method !== "GET") init.headers["X-Lowlabel-Token"] = TOKEN;
    const res = await fetch(path, init);
    if (!res.ok) {
      let msg = res.statusText;
      try { msg = (await res.json()).error || msg; } catch (e) { /* not JSON */ }
      throw new Error(`${res.status}: ${msg}`);
    }
    return res;
  }
  const itemPath = (id) => `/api/items/${encodeURIComponent(id)}`;
  async function bitmap(res) {
    return createImageBitmap(await res.blob(), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  }
  // the red channel of an 8-bit grey PNG: its values, one per pixel
  async function values(res, w, h) {
    const bmp = await bitmap(res);
    const c = document.createElement("canvas");
    c.width = w; c.height = h;
    const cx = c.getContext("2d", { willReadFrequently: true });
    cx.drawImage(bmp, 0, 0);
    const rgba = cx.getImageData(0, 0, w, h).data;
    const out = new Uint8Array(w * h);
    for (let i = 0; i < out.length; i++) out[i] = rgba[4 * i];
    return out;
  }

  // ---- PNG encoding of a label map (8-bit grey), for saving ---------------------------------
  const CRC = (() => {
    const t = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t[n] = c >>> 0;
    }
    return t;
  })();
  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) c = CRC[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }
  function chunk(type, data) {
    const out = new Uint8Array(12 + data.length);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, data.length);
    for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
    out.set(data, 8);
    dv.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
    return out;
  }
  async function zlib(bytes) {  // CompressionStream("deflate") writes the zlib format PNG wants
    const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  async function encodePng(label, w, h) {
    const raw = new Uint8Array((w + 1) * h);  // filter byte 0 (none) before each row
    for (let y = 0; y < h; y++) raw.set(label.subarray(y * w, (y + 1) * w), y * (w + 1) + 1);
    const ihdr = new Uint8Array(13);
    const dv = new DataView(ihdr.buffer);
    dv.setUint32(0, w); dv.setUint32(4, h);
    ihdr[8] = 8; ihdr[9] = 0; ihdr[10] = 0; ihdr[11] = 0; ihdr[12] = 0;  // 8-bit grey, no interlace
    const parts = [new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", ihdr), chunk("IDAT", await zlib(raw)), chunk("IEND", new Uint8Array(0))];
    return new Blob(parts, { type: "image/png" });
  }

  // ---- history ------------------------------------------------------------------------------
  function snapshot() {
    return { label: S.label, pending: S.pending && { ...S.pending, points: S.pending.points.slice() }, weakPoints: S.weakPoints.slice() };
  }
  function push() {
    S.undo.push(snapshot());
    if (S.undo.length > HISTORY) S.undo.shift();
    S.redo = [];
    buttons();
  }
  function restore(snap) {
    S.label = snap.label; S.pending = snap.pending; S.weakPoints = snap.weakPoints;
    S.segSeq++;  // an answer still on its way belongs to the state left behind
    render();
    buttons();
  }
  function undo() { if (S.undo.length) { S.redo.push(snapshot()); restore(S.undo.pop()); } }
  function redo() { if (S.redo.length) { S.undo.push(snapshot()); restore(S.redo.pop()); } }
  function editLabel() { push(); S.label = S.label.slice(); }

  // ---- the object being clicked ---------------------------------------------------------------
  function commitPending() {
    const p = S.pending;
    if (!p) return;
    if (p.mask) {
      const lab = S.label.slice();
      for (let i = 0; i < lab.length; i++) if (p.mask[i]) lab[i] = p.cls;
      S.undo.push(snapshot());
      S.redo = [];
      S.label = lab;
    }
    S.pending = null;
    render();
    buttons();
  }
  function dropPending() {
    if (!S.pending) return;
    push();
    S.pending = null;
    render();
  }
  async function runSegment() {
    const p = S.pending;
    if (!p || (!p.points.length && !p.box)) return;
    const seq = ++S.segSeq;
    const { width: w, height: h } = S.item;
    status("segmenting...");
    try {
      const res = await api(`${itemPath(S.item.id)}/segment`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ points: p.points, box: p.box }),
      });
      const mask = await values(res, w, h);
      if (seq !== S.segSeq || S.pending !== p) return;  // the prompts changed meanwhile
      p.mask = mask;
      status(`${S.session.segmenter}: score ${res.headers.get("X-Score")}, ${(1000 * Number(res.headers.get("X-Seconds"))).toFixed(0)} ms`);
      render();
    } catch (err) {
      status(`segment: ${err.message}`, true);
    }
  }
  function prompt(x, y, positive) {
    if (!S.session.segmenter) { status("no segmenter: use the brush or points", true); return; }
    push();
    if (!S.pending || S.pending.cls !== S.cls) {
      if (S.pending) { S.undo.pop(); commitPending(); push(); }
      S.pending = { cls: S.cls, points: [], box: null, mask: null };
    }
    S.pending = { ...S.pending, points: S.pending.points.concat([[x, y, positive ? 1 : 0]]) };
    S.clicks++;
    render();
    runSegment();
  }

  // ---- painting -----------------------------------------------------------------------------
  function stamp(cx, cy, erase, everyClass) {
    const { width: w, height: h } = S.item;
    const r = S.brush / 2;
    const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(h - 1, Math.ceil(cy + r));
    const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(w - 1, Math.ceil(cx + r));
    const lab = S.label;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
        if (dx * dx + dy * dy > r * r && !(x === Math.floor(cx) && y === Math.floor(cy))) continue;
        const i = y * w + x;
        if (!erase) lab[i] = S.cls;
        else if (everyClass || lab[i] === S.cls) lab[i] = UNLABELED;
      }
    }
  }
  function strokeTo(x, y) {
    const s = S.painting;
    const steps = Math.max(1, Math.ceil(Math.hypot(x - s.x, y - s.y) / Math.max(1, S.brush / 4)));
    for (let k = 1; k <= steps; k++) stamp(s.x + ((x - s.x) * k) / steps, s.y + ((y - s.y) * k) / steps, s.erase, s.every);
    s.x = x; s.y = y;
    render();
  }

  // ---- drawing ------------------------------------------------------------------------------
  function render() {
    if (!S.item) return;
    const { width: w, height: h } = S.item;
    ctx.clearRect(0, 0, w, h);
    ctx.drawImage(S.image, 0, 0);
    const img = octx.createImageData(w, h);
    const d = img.data;
    if (S.showUncertainty && S.uncertainty) {
      for (let i = 0; i < w * h; i++) {  // dark = certain, bright yellow = uncertain
        const u = S.uncertainty[i];
        d[4 * i] = 255; d[4 * i + 1] = u; d[4 * i + 2] = 0; d[4 * i + 3] = u;
      }
    } else if (S.showOverlay) {
      const pal = S.palette, lab = S.label, pm = S.pending && S.pending.mask, pc = S.pending && S.pending.cls;
      for (let i = 0; i < w * h; i++) {
        const c = pm && pm[i] ? pc : lab[i];
        if (c === UNLABELED) continue;
        const rgb = pal[c] || [255, 0, 255];  // a class id the dataset does not have (saving it is refused): magenta
        d[4 * i] = rgb[0]; d[4 * i + 1] = rgb[1]; d[4 * i + 2] = rgb[2]; d[4 * i + 3] = 255;
      }
    }
    octx.putImageData(img, 0, 0);
    ctx.globalAlpha = S.opacity;
    ctx.drawImage(overlay, 0, 0);
    ctx.globalAlpha = 1;
    const scale = w / view.getBoundingClientRect().width || 1;
    const r = Math.max(3, 5 * scale);
    const drawPoint = (x, y, color) => {
      ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI);
      ctx.fillStyle = color; ctx.fill(); ctx.lineWidth = Math.max(1, scale); ctx.strokeStyle = "#000"; ctx.stroke();
    };
    if (S.pending) {
      for (const [x, y, l] of S.pending.points) drawPoint(x, y, l ? "#3ba55c" : "#ed4245");
      if (S.pending.box) {
        const [x0, y0, x1, y1] = S.pending.box;
        ctx.lineWidth = Math.max(1, 2 * scale); ctx.strokeStyle = "#faa61a"; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      }
    }
    for (const [x, y] of S.weakPoints) {
      ctx.beginPath(); ctx.arc(x + 0.5, y + 0.5, r, 0, 2 * Math.PI); ctx.lineWidth = Math.max(1, scale); ctx.strokeStyle = "#fff"; ctx.stroke();
    }
    if (S.dragBox) {
      const [x0, y0, x1, y1] = S.dragBox;
      ctx.setLineDash([4 * scale, 4 * scale]); ctx.lineWidth = Math.max(1, 2 * scale); ctx.strokeStyle = "#faa61a";
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0); ctx.setLineDash([]);
    }
  }
  function buttons() {
    $("undo").disabled = !S.undo.length;
    $("redo").disabled = !S.redo.length;
    $("commit").disabled = !S.pending;
    for (const b of document.querySelectorAll("#tools button")) b.classList.toggle("active", b.dataset.tool === S.tool);
    for (const b of document.querySelectorAll("#classes button")) b.classList.toggle("active", Number(b.dataset.cls) === S.cls);
    const done = S.queue.filter((id) => S.done.has(id)).length;
    $("progress").textContent = `${done} of ${S.queue.length} done`;
    if (S.item) {
      $("position").textContent = `${S.item.index + 1} / ${S.queue.length}`;
      const q = $("queue");
      const stamp = `${S.queue.length}/${S.done.size}/${S.doneWeak.size}`;
      if (q.dataset.stamp !== stamp) {  // rebuilt when something was saved, not on every edit
        q.innerHTML = "";
        for (const id of S.queue) q.add(new Option(`${S.done.has(id) ? "\u2713 " : S.doneWeak.has(id) ? "\u00b7 " : ""}${id}`, id));
        q.dataset.stamp = stamp;
      }
      q.value = S.item.id;
      $("saved-flag").textContent = S.done.has(S.item.id) ? "saved" : S.doneWeak.has(S.item.id) ? "weak label saved" : "";
    }
  }

  // ---- images -------------------------------------------------------------------------------
  async function loadSource(source) {
    const { width: w, height: h } = S.item;
    if (source === "empty") return new Uint8Array(w * h).fill(UNLABELED);
    return values(await api(`${itemPath(S.item.id)}/labels/${encodeURIComponent(source)}`), w, h);
  }
  function defaultSource(item) {
    const has = (s) => item.sources.includes(s);
    if (S.done.has(item.id) && has("mask")) return "mask";
    if (has("prediction")) return "prediction";
    if (has("mask")) return "mask";
    return item.sources.find((s) => s.startsWith("weak:")) || "empty";
  }
  async function open(id) {
    if (S.busy) return;
    S.busy = true;
    status(`opening ${id}...`);
    try {
      const item = await (await api(itemPath(id))).json();
      const image = await bitmap(await api(`${itemPath(id)}/image`));
      S.item = item; S.image = image;
      S.sources = item.sources.concat(["empty"]);
      S.source = defaultSource(item);
      S.base = await loadSource(S.source);
      S.label = S.base;
      S.uncertainty = item.uncertainty ? await values(await api(`${itemPath(id)}/uncertainty`), item.width, item.height) : null;
      S.pending = null; S.undo = []; S.redo = []; S.clicks = 0; S.strokes = 0; S.weakPoints = []; S.opened = performance.now();
      S.segSeq++;
      view.width = overlay.width = item.width; view.height = overlay.height = item.height;
      fit();
      const sel = $("source");
      sel.innerHTML = "";
      for (const s of S.sources) sel.add(new Option(s, s, false, s === S.source));
      $("show-uncertainty").disabled = !item.uncertainty;
      if (history.replaceState) history.replaceState(null, "", `#${encodeURIComponent(id)}`);
      render(); buttons();
      status(`${id}: ${item.width}x${item.height}, from ${S.source}`);
      if (S.session.segmenter) {  // encode now, so that the first click answers quickly
        api(`${itemPath(id)}/embed`, { method: "POST" }).then(async (r) => {
          const t = (await r.json()).seconds;
          if (S.item && S.item.id === id) status(`${id}: ${item.width}x${item.height}, from ${S.source}; encoded in ${t.toFixed(2)} s`);
        }).catch((err) => status(`embed: ${err.message}`, true));
      }
    } catch (err) {
      status(`open ${id}: ${err.message}`, true);
    } finally {
      S.busy = false;
    }
  }
  function step(delta) {
    if (!S.item) return;
    const k = S.item.index + delta;
    if (k >= 0 && k < S.queue.length) open(S.queue[k]);
  }
  function nextUndone() {
    const start = S.item ? S.item.index + 1 : 0;
    for (let k = 0; k < S.queue.length; k++) {
      const id = S.queue[(start + k) % S.queue.length];
      if (!S.done.has(id)) return id;
    }
    return null;
  }
  async function save(weak) {
    if (!S.item || S.busy) return;
    commitPending();
    const { id, width: w, height: h } = S.item;
    S.busy = true;
    status(`saving ${id}...`);
    try {
      const seconds = ((performance.now() - S.opened) / 1000).toFixed(1);
      const q = `clicks=${S.clicks}&strokes=${S.strokes}&seconds=${seconds}`;
      const res = await api(`${itemPath(id)}/${weak ? "weak" : "mask"}?${q}`, {
        method: "POST", headers: { "Content-Type": "image/png" }, body: await encodePng(S.label, w, h),
      });
      const out = await res.json();
      (weak ? S.doneWeak : S.done).add(id);
      status(`saved ${out.saved.file} (${out.saved.clicks} clicks, ${out.saved.strokes} strokes, ${out.saved.seconds} s)`);
      buttons();
      return out;
    } catch (err) {
      status(`save ${id}: ${err.message}`, true);
      return null;
    } finally {
      S.busy = false;
    }
  }
  async function accept() {
    const out = await save(false);
    if (!out) return;
    const next = nextUndone();
    if (next && next !== S.item.id) open(next);
    else status(`saved; all ${S.queue.length} images of the queue are done`);
  }

  // the canvas as large as the window allows (pixels stay square; small images are enlarged)
  function fit() {
    if (!S.item) return;
    const main = document.querySelector("main");
    const availW = main.clientWidth - 20, availH = main.clientHeight - 20;
    const f = Math.max(0.05, Math.min(availW / S.item.width, availH / S.item.height));
    view.style.width = `${Math.floor(S.item.width * f)}px`;
    view.style.height = `${Math.floor(S.item.height * f)}px`;
    S.zoom = 1; S.pan = [0, 0];
    transform();
  }
  window.addEventListener("resize", fit);

  // zoom (mouse wheel, about the cursor; 0 fits again) and pan (middle button, or Space + drag)
  function transform() {
    view.style.transformOrigin = "0 0";
    view.style.transform = `translate(${S.pan[0]}px, ${S.pan[1]}px) scale(${S.zoom})`;
    render();
  }
  $("stage").addEventListener("wheel", (ev) => {
    if (!S.item) return;
    ev.preventDefault();
    const r = $("stage").getBoundingClientRect();
    const mx = ev.clientX - r.left, my = ev.clientY - r.top;
    const z = Math.min(32, Math.max(1, S.zoom * Math.exp(-ev.deltaY / 500)));
    S.pan = [mx - ((mx - S.pan[0]) * z) / S.zoom, my - ((my - S.pan[1]) * z) / S.zoom];
    S.zoom = z;
    if (z === 1) S.pan = [0, 0];
    transform();
  }, { passive: false });
  let spaceDown = false;
  document.addEventListener("keyup", (ev) => { if (ev.key === " ") spaceDown = false; });

  // ---- input --------------------------------------------------------------------------------
  function at(ev) {
    const rect = view.getBoundingClientRect();
    const x = ((ev.clientX - rect.left) * view.width) / rect.width;
    const y = ((ev.clientY - rect.top) * view.height) / rect.height;
    return [Math.min(Math.max(x, 0), view.width - 1e-3), Math.min(Math.max(y, 0), view.height - 1e-3)];
  }
  view.addEventListener("contextmenu", (ev) => ev.preventDefault());
  view.addEventListener("pointerdown", (ev) => {
    if (!S.item) return;
    if (ev.button === 1 || (spaceDown && ev.button === 0)) {  // pan
      ev.preventDefault();
      S.panning = { x: ev.clientX, y: ev.clientY, pan: S.pan.slice() };
      view.setPointerCapture(ev.pointerId);
      return;
    }
    if (S.busy) return;
    const [x, y] = at(ev);
    if (S.tool === "click") {
      prompt(x, y, ev.button !== 2 && !ev.shiftKey);
    } else if (S.tool === "box" && ev.button === 0) {
      S.dragBox = [x, y, x, y];
      view.setPointerCapture(ev.pointerId);
    } else if ((S.tool === "brush" || S.tool === "eraser") && ev.button === 0) {
      commitPending();
      editLabel();
      S.strokes++;
      S.painting = { x, y, erase: S.tool === "eraser", every: ev.shiftKey };
      stamp(x, y, S.painting.erase, S.painting.every);
      render();
      view.setPointerCapture(ev.pointerId);
    } else if (S.tool === "point" && ev.button === 0) {
      commitPending();
      editLabel();
      const px = Math.floor(x), py = Math.floor(y);
      S.label[py * S.item.width + px] = S.cls;
      S.weakPoints = S.weakPoints.concat([[px, py]]);
      S.clicks++;
      render();
    }
  });
  view.addEventListener("pointermove", (ev) => {
    if (S.panning) {
      const p = S.panning;
      S.pan = [p.pan[0] + ev.clientX - p.x, p.pan[1] + ev.clientY - p.y];
      transform();
    } else if (S.painting) strokeTo(...at(ev));
    else if (S.dragBox) { const [x, y] = at(ev); S.dragBox[2] = x; S.dragBox[3] = y; render(); }
  });
  const end = () => {
    S.panning = null;
    if (S.painting) { S.painting = null; buttons(); }
    if (S.dragBox) {
      const [a, b, c, d] = S.dragBox;
      S.dragBox = null;
      const box = [Math.min(a, c), Math.min(b, d), Math.max(a, c), Math.max(b, d)];
      if (box[2] - box[0] < 2 || box[3] - box[1] < 2) { render(); return; }
      if (!S.session.segmenter) { status("no segmenter: use the brush or points", true); render(); return; }
      push();
      if (S.pending && S.pending.cls !== S.cls) { S.undo.pop(); commitPending(); push(); }
      S.pending = { ...(S.pending || { cls: S.cls, points: [], mask: null }), box };
      S.clicks++;
      render();
      runSegment();
    }
  };
  view.addEventListener("pointerup", end);
  view.addEventListener("pointercancel", end);

  function setTool(t) { if (t !== "click" && t !== "box") commitPending(); S.tool = t; buttons(); }
  function setClass(c) { if (c >= 0 && c < S.classes.length) { if (S.pending && c !== S.pending.cls) commitPending(); S.cls = c; buttons(); } }
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" && ev.target.type !== "range" && ev.target.type !== "checkbox") return;
    if (ev.target.tagName === "SELECT") return;
    const k = ev.key, ctrl = ev.ctrlKey || ev.metaKey;
    let handled = true;
    if (ctrl && (k === "z" || k === "Z")) ev.shiftKey ? redo() : undo();
    else if (ctrl && (k === "y" || k === "Y")) redo();
    else if (ctrl && (k === "s" || k === "S")) accept();
    else if (ctrl) handled = false;
    else if (k === "ArrowRight" || k === "d") step(1);
    else if (k === "ArrowLeft" || k === "a") step(-1);
    else if (k === "Enter") accept();
    else if (k === "w") save(true);
    else if (k === "z") undo();
    else if (k === "Z" || k === "y") redo();
    else if (k === "c") setTool("click");
    else if (k === "x") setTool("box");
    else if (k === "b") setTool("brush");
    else if (k === "e") setTool("eraser");
    else if (k === "p") setTool("point");
    else if (k === "n") commitPending();
    else if (k === "Escape") dropPending();
    else if (k === "[") { S.brush = Math.max(1, S.brush - 2); $("brush").value = S.brush; }
    else if (k === "]") { S.brush = Math.min(60, S.brush + 2); $("brush").value = S.brush; }
    else if (k === "o") { S.showOverlay = !S.showOverlay; render(); }
    else if (k === "u") { if (S.uncertainty) { S.showUncertainty = !S.showUncertainty; $("show-uncertainty").checked = S.showUncertainty; render(); } }
    else if (k === "-") { S.opacity = Math.max(0, S.opacity - 0.1); $("opacity").value = Math.round(100 * S.opacity); render(); }
    else if (k === "=" || k === "+") { S.opacity = Math.min(1, S.opacity + 0.1); $("opacity").value = Math.round(100 * S.opacity); render(); }
    else if (k === "?") $("help").showModal();
    else if (k === " ") spaceDown = true;
    else if (k === "0") fit();
    else if (/^[1-9]$/.test(k)) setClass(Number(k) - 1);
    else handled = false;
    if (handled) ev.preventDefault();
  });
  for (const b of document.querySelectorAll("#tools button")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("commit").addEventListener("click", commitPending);
  $("accept").addEventListener("click", accept);
  $("save-weak").addEventListener("click", () => save(true));
  $("help-button").addEventListener("click", () => $("help").showModal());
  $("brush").addEventListener("input", (ev) => { S.brush = Number(ev.target.value); });
  $("opacity").addEventListener("input", (ev) => { S.opacity = Number(ev.target.value) / 100; render(); });
  $("show-uncertainty").addEventListener("change", (ev) => { S.showUncertainty = ev.target.checked; render(); });
  $("queue").addEventListener("change", (ev) => { open(ev.target.value); ev.target.blur(); });
  $("source").addEventListener("change", async (ev) => {
    const source = ev.target.value;
    try {
      const lab = await loadSource(source);
      push();
      S.pending = null; S.source = source; S.label = lab;
      render();
      status(`started again from ${source} (undo brings back the edits)`);
    } catch (err) {
      status(`${source}: ${err.message}`, true);
    }
  });

  // ---- start --------------------------------------------------------------------------------
  async function start() {
    try {
      const s = await (await api("/api/session")).json();
      S.session = s; S.classes = s.classes; S.palette = s.palette; S.queue = s.queue;
      S.done = new Set(s.done); S.doneWeak = new Set(s.done_weak);
      const box = $("classes");
      s.classes.forEach((name, i) => {
        const b = document.createElement("button");
        b.dataset.cls = String(i);
        const sw = document.createElement("span");
        sw.className = "swatch";
        sw.style.background = `rgb(${s.palette[i].join(",")})`;
        b.append(sw, document.createTextNode(`${i < 9 ? i + 1 + " " : ""}${name}`));
        b.addEventListener("click", () => setClass(i));
        box.append(b);
      });
      if (!s.segmenter) S.tool = "brush";  // nothing to click with
      $("segmenter").textContent = s.segmenter ? `segmenter: ${s.segmenter}${s.random_weights ? " (random weights: masks are noise)" : ""}` : "no segmenter";
      const wanted = decodeURIComponent(location.hash.slice(1));
      const first = s.queue.includes(wanted) ? wanted : s.queue.find((id) => !S.done.has(id)) || s.queue[0];
      buttons();
      await open(first);
    } catch (err) {
      status(`start: ${err.message}`, true);
    }
  }
  // read-only view of the state, for the browser tests and the console
  window.lowlabelAnnotate = {
    state: () => ({ id: S.item && S.item.id, tool: S.tool, cls: S.cls, clicks: S.clicks, strokes: S.strokes, busy: S.busy,
                    pending: !!S.pending, pendingMask: !!(S.pending && S.pending.mask), source: S.source, done: [...S.done],
                    uncertainty: !!S.uncertainty, showUncertainty: S.showUncertainty, zoom: S.zoom }),
    uncertaintyAt: (x, y) => S.uncertainty[Math.floor(y) * S.item.width + Math.floor(x)],
    labelAt: (x, y) => {
      const i = Math.floor(y) * S.item.width + Math.floor(x);
      return S.pending && S.pending.mask && S.pending.mask[i] ? S.pending.cls : S.label[i];
    },
    label: () => Array.from(S.label),
  };
  start();
})();
