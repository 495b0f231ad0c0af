"""How far a segmenter's confidences can be trusted: a reliability curve, the expected calibration
error, and what a confidence threshold keeps, per class.

A pseudo-label method keeps the pixels whose top softmax probability reaches a threshold (0.95 for
FixMatch / UniMatch). Whether that pays depends on two things the training loss does not show:
whether "0.95 confident" means 95 % correct (calibration), and which classes reach the threshold at
all (ACDC's thin myocardium may never do, so the unlabeled terms only ever teach background).

- **Reliability curve and ECE** (Guo et al. 2017, "On Calibration of Modern Neural Networks",
  sec. 2): pixels binned by confidence into ``bins`` equal-width bins over [0, 1]; per bin the mean
  confidence and the accuracy of the argmax; ECE = sum_b (n_b / n) |acc_b - conf_b|, MCE = max_b
  |acc_b - conf_b| over non-empty bins. "Over-confident" bins have acc < conf.
- **At a threshold** t: the share of pixels with confidence >= t (what a pseudo-label rule keeps),
  their accuracy, and per class c: *precision* (of the kept pixels labeled c, the share truly c),
  *recall* (of the true-c pixels, the share kept and labeled c) and the class's share of all kept
  pixels against its share of all pixels.

Pixels are counted into fixed histograms image by image, so an evaluation over thousands of
full-size images holds one image's maps at a time. Written here rather than taken from a library:
torchmetrics' ``MulticlassCalibrationError`` needs the full probability tensors (C x pixels) and has
no per-class keep statistics, and scikit-learn's ``calibration_curve`` is binary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Calibration:
    """Streaming counts for :meth:`summary`: feed (confidence, predicted class, true class) maps."""

    def __init__(self, num_classes: int, *, bins: int = 15, threshold: float = 0.95, ignore_index: int = 255):
        if bins < 1:
            raise ValueError(f"calibration needs at least one bin, got {bins}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"the confidence threshold must lie in (0, 1], got {threshold}")
        self.num_classes, self.bins, self.threshold, self.ignore_index = int(num_classes), int(bins), float(threshold), ignore_index
        self.count = np.zeros(self.bins, np.int64)
        self.conf_sum = np.zeros(self.bins, np.float64)
        self.correct = np.zeros(self.bins, np.int64)
        c = self.num_classes
        self.kept_pred = np.zeros(c, np.int64)  # kept pixels predicted c
        self.kept_correct = np.zeros(c, np.int64)  # ... and truly c
        self.true = np.zeros(c, np.int64)  # pixels truly c
        self.images = 0

    def update(self, confidence: np.ndarray, pred: np.ndarray, target: np.ndarray) -> None:
        """One image: ``confidence`` [H, W] (the top softmax probability), ``pred`` [H, W] (its
        class), ``target`` [H, W] (the true class; ``ignore_index`` pixels are left out)."""
        if not (confidence.shape == pred.shape == target.shape):
            raise ValueError(f"confidence {confidence.shape}, prediction {pred.shape} and mask {target.shape} differ in size")
        valid = target != self.ignore_index
        conf = np.asarray(confidence, np.float64)[valid]
        p, t = np.asarray(pred, np.int64)[valid], np.asarray(target, np.int64)[valid]
        if t.size and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"mask holds class {int(t.max())} but the model has {self.num_classes} classes")
        ok = p == t
        b = np.clip((conf * self.bins).astype(np.int64), 0, self.bins - 1)
        self.count += np.bincount(b, minlength=self.bins)
        self.conf_sum += np.bincount(b, weights=conf, minlength=self.bins)
        self.correct += np.bincount(b, weights=ok, minlength=self.bins).astype(np.int64)
        keep = conf >= self.threshold
        self.kept_pred += np.bincount(p[keep], minlength=self.num_classes)[: self.num_classes]
        self.kept_correct += np.bincount(p[keep & ok], minlength=self.num_classes)[: self.num_classes]
        self.true += np.bincount(t, minlength=self.num_classes)
        self.images += 1

    def summary(self, class_names: list[str] | None = None) -> dict:
        """ECE, MCE, accuracy, the reliability bins and the threshold's keep statistics (percent
        where a share; None where undefined)."""
        n = int(self.count.sum())
        names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        bins, ece, mce = [], 0.0, 0.0
        for i in range(self.bins):
            k = int(self.count[i])
            conf = self.conf_sum[i] / k if k else None
            acc = self.correct[i] / k if k else None
            if k:
                gap = abs(acc - conf)
                ece += k / n * gap
                mce = max(mce, gap)
            bins.append({"lo": i / self.bins, "hi": (i + 1) / self.bins, "pixels": k, "confidence": _r(conf), "accuracy": _r(acc)})
        kept = int(self.kept_pred.sum())
        per_class = {}
        for c, name in enumerate(names):
            per_class[name] = {
                "precision": _pct(self.kept_correct[c], self.kept_pred[c]),
                "recall": _pct(self.kept_correct[c], self.true[c]),
                "share_of_kept": _pct(self.kept_pred[c], kept),
                "share_of_pixels": _pct(self.true[c], n),
            }
        return {
            "images": self.images, "pixels": n, "bins": bins,
            "ece": _pct(ece, 1) if n else None, "mce": _pct(mce, 1) if n else None,
            "accuracy": _pct(self.correct.sum(), n), "mean_confidence": _pct(self.conf_sum.sum(), n),
            "threshold": self.threshold, "kept": _pct(kept, n), "kept_accuracy": _pct(self.kept_correct.sum(), kept),
            "per_class": per_class,
        }


def _r(v):
    return None if v is None else round(float(v), 6)


def _pct(a, b):
    return None if not b else round(100.0 * float(a) / float(b), 3)


def plot_reliability(summary: dict, out: str | Path, title: str = "") -> Path:
    """The reliability diagram (accuracy per confidence bin against the diagonal, gaps shaded) above
    the pixel histogram, ECE and the threshold's keep share in the title. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = summary["bins"]
    width = bins[0]["hi"] - bins[0]["lo"]
    mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
    fig, (a, h) = plt.subplots(2, 1, figsize=(5.2, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    a.plot([0, 1], [0, 1], "--", color="0.5", lw=1, label="perfectly calibrated")
    filled = [(m, b) for m, b in zip(mids, bins) if b["pixels"]]
    a.bar([m for m, _ in filled], [b["accuracy"] for _, b in filled], width=width * 0.95, color="C0", alpha=0.8, label="accuracy")
    a.bar([m for m, _ in filled], [b["confidence"] - b["accuracy"] for _, b in filled], bottom=[b["accuracy"] for _, b in filled],
          width=width * 0.95, color="C3", alpha=0.35, label="gap (confidence - accuracy)")
    a.axvline(summary["threshold"], color="C2", lw=1.2, label=f"threshold {summary['threshold']:g}")
    a.set_xlim(0, 1)
    a.set_ylim(0, 1)
    a.set_ylabel("accuracy of the argmax")
    ece = summary["ece"]
    a.set_title(f"{title}\nECE {ece:.1f} %, kept at threshold {summary['kept'] or 0:.1f} % of pixels, "
                f"{summary['kept_accuracy'] or 0:.1f} % correct" if ece is not None else title, fontsize=9)
    a.legend(fontsize=8, loc="upper left")
    a.grid(alpha=0.3)
    total = max(1, summary["pixels"])
    h.bar(mids, [100 * b["pixels"] / total for b in bins], width=width * 0.95, color="0.4")
    h.set_xlabel("confidence (top softmax probability)")
    h.set_ylabel("% of pixels")
    h.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def calibration_table(summary: dict, title: str = ""):
    """A rich table of the threshold's per-class keep statistics, ECE in the caption."""
    from rich.table import Table

    def f(v):
        return "-" if v is None else f"{v:.1f}"

    t = Table(title=title, caption=(f"ECE {f(summary['ece'])} %, MCE {f(summary['mce'])} %; accuracy {f(summary['accuracy'])} % at mean confidence "
                                    f"{f(summary['mean_confidence'])} %; confidence >= {summary['threshold']:g} keeps {f(summary['kept'])} % of "
                                    f"pixels, {f(summary['kept_accuracy'])} % correct"))
    for col in ("class", "% of pixels", "% of kept", "precision kept", "recall kept"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for name, r in summary["per_class"].items():
        t.add_row(name, f(r["share_of_pixels"]), f(r["share_of_kept"]), f(r["precision"]), f(r["recall"]))
    return t
