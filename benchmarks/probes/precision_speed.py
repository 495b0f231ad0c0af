"""How much faster are training steps, inference, tiled prediction and SAM encoding in bf16 autocast and channels_last than in fp32 on this CPU?

Finding (2026-12-03, AMD EPYC Zen 3 with AVX2 only, one thread, under load; results in
benchmarks/results/cpu-precision/): bf16 is emulated there and 9-60x *slower* (UniMatch ACDC step
0.11x, DeepLabV3+ step 0.07x with channels_last, SAM ViT-B encode ~0.06x; a 1024² bf16 matmul
1 GFLOP/s against fp32's 73), so ``train.precision: auto`` keeps fp32 on such CPUs;
channels_last changed fp32 training by ±5 % and made UNet inference 1.2x faster. The 2x gains
that motivated bf16 were measured on a CPU with AMX; this script is the check to rerun there.

Run: python benchmarks/probes/precision_speed.py [--threads 1 2] [--reps 3] [--out benchmarks/results/cpu-precision]

Every variant of one measurement runs interleaved in one process (round-robin, after one warm-up
step each), so the ratios compare like with like; absolute seconds depend on what else runs. A
variant whose warm-up is over 8x slower than fp32's is not run again (its ratio is clear): the
warm-up is its measurement.
Training steps are lowlabel's own ``Trainer.step`` on the protocols' data and recipes:
- ``acdc-unimatch``: acdc-cpu-1500's UniMatch (UNet2D w16, 128², 8 labeled + 8 unlabeled);
- ``dubai-deeplabv3plus``: DeepLabV3+/ResNet-18, supervised, 256² crops, batch 8 (dubai-aerial);
- ``dsb2018-maskrcnn``: dsb2018-lr3e-4-cpu's labeled-only Mask R-CNN R18-FPN, 128² crops, batch 4.
FLOPs of a step are counted by ``torch.utils.flop_counter`` (matmuls and convolutions), so each
step's achieved GFLOP/s can be set against the measured peak matmul rate of its precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
DATA = REPO.parent / "shared" / "datasets"
VARIANTS = {"fp32": ("fp32", False), "fp32+cl": ("fp32", True), "bf16": ("bf16", False), "bf16+cl": ("bf16", True)}


def recipe(name: str, out: str) -> dict:
    import yaml

    if name == "acdc-unimatch":
        proto = yaml.safe_load((REPO / "benchmarks/protocols/acdc-cpu-1500.yaml").read_text())
        raw = proto["config"]
        raw["data"] = {**raw["data"], "root": str(DATA / "acdc-scribbles"), "labeled": str(DATA / "acdc-scribbles/splits/ssl-labeled-3.txt"), "unlabeled_gt": False}
        raw["method"] = proto["methods"]["unimatch"]["method"]
    elif name == "dubai-deeplabv3plus":
        raw = {"data": {"root": str(DATA / "dubai-aerial"), "labeled": "1/4", "crop": 256, "labeled_batch": 8, "unlabeled_batch": 8},
               "model": {"arch": "deeplabv3plus", "encoder": "resnet18"}, "method": {"name": "supervised"}}
    elif name == "dsb2018-maskrcnn":
        proto = yaml.safe_load((REPO / "benchmarks/protocols/dsb2018-lr3e-4-cpu.yaml").read_text())
        raw = proto["config"]
        raw["data"] = {**raw["data"], "root": str(DATA / "dsb2018-nuclei"), "labeled": "1/8"}
        raw["method"] = {"name": "supervised"}
    else:
        raise ValueError(name)
    raw.update(out_dir=out, name=name)
    raw["train"] = {**raw.get("train", {}), "iterations": 1000, "val_every": 0, "grad_norm_every": 0}
    return raw


def peak_matmul(dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` (best of ``reps``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_flops(trainer, lab, unl) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        trainer.step(lab, unl)
    return fc.get_total_flops()


def interleaved(fns: dict, reps: int, slow_factor: float = 8.0) -> dict:
    """Median seconds per call of each function, calls interleaved round-robin after one warm-up
    each. A function whose warm-up took over ``slow_factor`` x the first one's is not called
    again: its warm-up is its one measurement (``timed: first call``; it includes one-time setup,
    which is small beside such a slowdown)."""
    warm = {k: _timed(f) for k, f in fns.items()}
    ref = warm[next(iter(fns))]
    slow = {k for k, w in warm.items() if w > slow_factor * ref}
    times = {k: ([warm[k]] if k in slow else []) for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if k not in slow:
                times[k].append(_timed(f))
    return {k: {"median_s": round(statistics.median(v), 4), "runs": len(v), "timed": "first call" if k in slow else f"median of {len(v)} after a warm-up",
                "all_s": [round(x, 4) for x in v]} for k, v in times.items()}


def train_steps(name: str, threads: int, reps: int, variants: list[str]) -> dict:
    from lowlabel.config import load_config
    from lowlabel.engine.trainer import Trainer

    torch.set_num_threads(threads)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainers, batches = {}, {}
        for v in variants:
            prec, cl = VARIANTS[v]
            raw = recipe(name, tmp)
            raw["name"] = f"{name}-{v.replace('+', '-')}"
            raw["train"] = {**raw["train"], "precision": prec, "channels_last": cl}
            tr = Trainer(load_config(raw=raw), progress=False)
            lab_it = tr.lab_stream.batches(0)
            unl_it = tr.unl_stream.batches(0) if tr.unl_stream else None
            batches[v] = (tr._to_device(next(lab_it)), tr._to_device(next(unl_it)) if unl_it else None)
            trainers[v] = tr
        first = trainers[variants[0]]
        flops = step_flops(first, *batches[variants[0]])
        imgs = first.cfg.data.labeled_batch + (first.cfg.data.unlabeled_batch if first.unl_stream else 0)
        res = interleaved({v: (lambda v=v: trainers[v].step(*batches[v])) for v in variants}, reps)
        for v, r in res.items():
            r["images_per_s"] = round(imgs / r["median_s"], 3)
            r["gflops_per_s"] = round(flops / r["median_s"] / 1e9, 2)
            r["speedup_vs_fp32"] = round(res[variants[0]]["median_s"] / r["median_s"], 3)
        # inference: the student's eval forward on the labeled batch, same variants
        inf = {}
        for v in variants:
            tr = trainers[v]
            net = tr.student.eval()
            x = batches[v][0]["image"]

            def fwd(net=net, x=x, tr=tr):
                with torch.no_grad(), tr.precision.autocast():
                    net(x) if getattr(net, "task", "semantic") != "instance" else net.detect(x, score_threshold=0.05)
            inf[v] = fwd
        ires = interleaved(inf, reps)
        for v, r in ires.items():
            r["images_per_s"] = round(len(batches[v][0]["image"]) / r["median_s"], 3)
            r["speedup_vs_fp32"] = round(ires[variants[0]]["median_s"] / r["median_s"], 3)
        out = {"train_step": res, "inference": ires, "step_gflop": round(flops / 1e9, 2), "images_per_step": imgs}
    return out


def tiled_prediction(threads: int, reps: int, side: int = 1024) -> dict:
    """MP/s of ``sliding_window`` (tile 512, overlap 0.25) over a side x side RGB image with
    DeepLabV3+/R18 in each variant."""
    from lowlabel.eval.inference import sliding_window
    from lowlabel.models import build_model
    from lowlabel.precision import resolve_precision

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    fns = {}
    for v, (prec, cl) in VARIANTS.items():
        net = build_model("deeplabv3plus", "resnet18", 6).eval()
        p = resolve_precision(prec, "cpu", channels_last=cl)
        p.prepare(net)
        fns[v] = lambda net=net, p=p: sliding_window(net, image, 6, tile=512, overlap=0.25, batch_size=4, precision=p)
    res = interleaved(fns, reps)
    for r in res.values():
        r["megapixels_per_s"] = round(side * side / 1e6 / r["median_s"], 3)
        r["speedup_vs_fp32"] = round(res["fp32"]["median_s"] / r["median_s"], 3)
    return res


def sam_encode(threads: int) -> dict:
    """Seconds of one SAM ViT-B image encoding (random weights of the real architecture) of a
    1024 x 768 image in fp32 and bf16. Where bf16 is emulated (no CPU bf16 units: a 2048² bf16
    matmul ran at 0.3 GFLOP/s on such a machine, so the whole encoder would take ~half an hour),
    bf16 times the patch embedding, one windowed- and one global-attention block and the neck,
    and reports their sum over the encoder's blocks as an estimate (``estimated``)."""
    from lowlabel.precision import cpu_bf16_units, resolve_precision
    from lowlabel.sam import build_segmenter

    torch.set_num_threads(threads)
    image = np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    seg = build_segmenter("sam", model_type="vit_b", precision="fp32")
    res = interleaved({"fp32": lambda: seg.embed(image)}, 1)
    if cpu_bf16_units():
        b = build_segmenter("sam", model_type="vit_b", precision="bf16")
        res.update(interleaved({"bf16": lambda: b.embed(image)}, 1))
    else:
        enc = seg.sam.image_encoder
        x = seg.sam.preprocess(torch.as_tensor(seg.resize.apply_image(image)).permute(2, 0, 1)[None].float())
        with torch.no_grad(), resolve_precision("bf16", "cpu").autocast():
            t0 = time.perf_counter()
            tok = enc.patch_embed(x) + enc.pos_embed
            t1 = time.perf_counter()
            windowed = [i for i, blk in enumerate(enc.blocks) if blk.window_size > 0]
            glob = [i for i in range(len(enc.blocks)) if i not in windowed]
            tw = _timed(lambda: enc.blocks[windowed[0]](tok))  # a windowed-attention block
            tg = _timed(lambda: enc.blocks[glob[0]](tok)) if glob else 0.0  # a global-attention block
            t2 = time.perf_counter()
            enc.neck(tok.permute(0, 3, 1, 2))
            t3 = time.perf_counter()
        est = (t1 - t0) + len(windowed) * tw + len(glob) * tg + (t3 - t2)
        res["bf16"] = {"median_s": round(est, 2), "runs": 1,
                       "timed": f"estimated: patch embedding + {len(windowed)} x a windowed block + {len(glob)} x a global block + neck, one call each",
                       "all_s": [round(t1 - t0, 3), round(tw, 3), round(tg, 3), round(t3 - t2, 3)]}
    for r in res.values():
        r["speedup_vs_fp32"] = round(res["fp32"]["median_s"] / r["median_s"], 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--recipes", nargs="+", default=["acdc-unimatch", "dubai-deeplabv3plus", "dsb2018-maskrcnn"])
    ap.add_argument("--no-sam", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/cpu-precision"))
    args = ap.parse_args()

    from lowlabel.precision import cpu_bf16_units, cpu_name, resolve_precision

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()} ({torch.get_num_threads()} threads available), {platform.machine()}",
        "cpu_bf16_units": list(cpu_bf16_units()), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto_picks": resolve_precision("auto", "cpu").describe(),
        "command": "python benchmarks/precision_speed.py " + " ".join(f"--threads {' '.join(map(str, args.threads))} --reps {args.reps}".split()),
        "threads": {},
    }
    for t in args.threads:
        torch.set_num_threads(t)
        entry = {"peak_matmul_gflops": {"fp32": round(peak_matmul(torch.float32), 1), "bf16": round(peak_matmul(torch.bfloat16), 1)}}
        print(f"[{t} thread(s)] peak matmul GFLOP/s: {entry['peak_matmul_gflops']}", flush=True)
        for name in args.recipes:
            variants = ["fp32", "bf16"] if name == "dsb2018-maskrcnn" else list(VARIANTS)  # Mask R-CNN claims no channels_last
            entry[name] = train_steps(name, t, args.reps, variants)
            for v, r in entry[name]["train_step"].items():
                prec = "bf16" if v.startswith("bf16") else "fp32"
                r["share_of_peak"] = round(r["gflops_per_s"] / entry["peak_matmul_gflops"][prec], 3)
            print(f"[{t}] {name}: " + json.dumps({k: {v: r["speedup_vs_fp32"] for v, r in entry[name][k].items()} for k in ("train_step", "inference")}), flush=True)
        entry["tiled_prediction_1024"] = tiled_prediction(t, args.reps)
        print(f"[{t}] tiled prediction: " + json.dumps({v: r["megapixels_per_s"] for v, r in entry["tiled_prediction_1024"].items()}), flush=True)
        if not args.no_sam and t == max(args.threads):
            entry["sam_vit_b_encode"] = sam_encode(t)
            print(f"[{t}] SAM ViT-B encode: " + json.dumps({v: r["median_s"] for v, r in entry["sam_vit_b_encode"].items()}), flush=True)
        res["threads"][str(t)] = entry
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {out / 'results.json'}")


if __name__ == "__main__":
    main()
