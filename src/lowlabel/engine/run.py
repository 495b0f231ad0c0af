"""A trained run: evaluate and predict from Python (``lowlabel.fit`` returns one) or the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import Config, EvalConfig, eval_precision
from ..data.dataset import IMAGE_EXTENSIONS, DatasetError, FolderDataset, as_rgb, check_image_file, write_label
from ..data.validate import require_valid
from ..data.tiling import WindowReader, open_reader
from ..eval.inference import Prediction, for_eval, sliding_window
from ..models import build_model
from ..precision import resolve_precision
from ..utils import progress_bar, resolve_device
from ..errors import CheckpointError
from .trainer import evaluate_model, read_checkpoint


def process_shard() -> tuple[int, int]:
    """(rank, world size) of this process under ``torchrun`` (its ``RANK`` and ``WORLD_SIZE``
    variables), (0, 1) otherwise: prediction needs no process group to split files."""
    import os

    return int(os.environ.get("RANK", 0)), max(1, int(os.environ.get("WORLD_SIZE", 1)))


class Predictor:
    """Tiled prediction of a model with classes and a palette: ``predict`` (one image),
    ``predict_folder`` (label PNGs, overlays, GeoTIFFs), ``predict_instances`` (instance models).
    :class:`Run` is one; so is :class:`lowlabel.export.ExportedRun`, a file exported from a run.

    A subclass sets ``model`` (a callable mapping float images [B, C, h, w] in [0, 1] to logits, or
    an instance model), ``classes``, ``palette``, ``eval_cfg`` (an
    :class:`~lowlabel.config.EvalConfig`), ``device``, ``precision`` (a
    :class:`~lowlabel.precision.Precision`, or None for fp32), ``task`` and ``raster_options()``.
    """

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def raster_options(self) -> tuple:
        """(bands, value_range) the model was trained with (``data.bands``), for reading inputs alike."""
        return (self.config.data.bands, self.config.data.value_range) if self.config else (None, None)

    def predict(self, image: np.ndarray | torch.Tensor | WindowReader | str | Path, *, return_probs: bool = False, progress=None, sink=None) -> Prediction:
        """Predict one image of any size (tiled by the run's eval settings). ``image``: uint8
        [H, W, 3] array, float [3, H, W] tensor in [0, 1], a window reader or a file path.
        ``sink(y0, labels_rows, confidence_rows)``: receive the rows as they are finished
        instead of whole arrays (flat memory; e.g. :class:`lowlabel.data.raster.GeoTiffSink`)."""
        if isinstance(image, (str, Path)):
            image = open_reader(image, *self.raster_options())
        e = self.eval_cfg
        return sliding_window(
            for_eval(self.model, e), image, self.num_classes, tile=e.tile, overlap=e.overlap, weighting=e.weighting,
            batch_size=e.batch_size, device=self.device, return_probs=return_probs, progress=progress, sink=sink, precision=self.precision,
        )

    def predict_instances(self, image: np.ndarray | torch.Tensor | str | Path, score_threshold: float = 0.5):
        """An instance run's :class:`~lowlabel.eval.instances.Instances` of one image (uint8
        [H, W, 3] array, float [3, H, W] tensor or file path), tiled by the run's eval settings
        and merged across tile borders."""
        from ..eval.instances import predict_instances

        if self.task != "instance":
            raise ValueError("predict_instances needs an instance run (model.arch maskrcnn); use predict()")
        if isinstance(image, (str, Path)):
            reader = open_reader(image, *self.raster_options())
            image = reader.read(0, 0, reader.height, reader.width)
        e = self.eval_cfg
        return predict_instances(self.model, image, tile=e.tile, overlap=e.overlap, score_threshold=score_threshold, device=self.device, precision=self.precision)

    def overlay(self, image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        pal = np.array(self.palette + [(0, 0, 0)] * (256 - len(self.palette)), dtype=np.float32)
        return (as_rgb(image).astype(np.float32) * (1 - alpha) + pal[labels] * alpha).clip(0, 255).astype(np.uint8)

    def predict_folder(self, images: str | Path, out: str | Path, *, overlays: bool = True, progress: bool = False, confidence: bool = False,
                       vector: str | None = None, min_area: float = 0.0, simplify: float = 0.0) -> list[Path]:
        """For every image in a folder (or one image): ``<id>.png`` label maps (palette PNG,
        values = class ids) and, with ``overlays``, ``overlays/<id>.jpg`` colour blends. A
        georeferenced raster (GeoTIFF, COG, JPEG 2000, VRT; needs rasterio) gives ``<id>.tif``
        instead: a Cloud Optimized GeoTIFF on the input's grid (CRS, transform), palette as colour
        map, 255 = nodata where the input is nodata, a confidence band with ``confidence``; so does
        a tiled or pyramidal TIFF without georeferencing (a whole slide: no CRS, pixel grid); its
        rows are written as they are finished, so memory stays flat, and no overlay is made (a
        GIS shows the colour map over the image). ``vector`` (``"gpkg"`` or ``"geojson"``) adds
        ``<id>.<vector>``: the label map's polygons per class (:func:`lowlabel.data.raster.polygonize`,
        ``min_area`` and ``simplify`` in map units).

        Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) each process predicts every
        ``WORLD_SIZE``-th file from its ``RANK`` on and returns what it wrote: no file is written
        twice, and each is the one a single process writes. An instance run's folder (one
        ``instances.json`` for all images) is predicted by rank 0 alone."""
        from PIL import Image

        from ..data.raster import RASTER_EXTENSIONS, GeoTiffSink, RasterReader, have_rasterio, polygonize

        images, out = Path(images), Path(out)
        rank, world = process_shard()
        if self.task == "instance":
            return self._predict_instance_folder(images, out, overlays=overlays, progress=progress) if rank == 0 else []
        if vector and not have_rasterio():
            raise ImportError("vector output needs the geo extra: pip install 'lowlabel[geo]'")
        exts = tuple(dict.fromkeys(IMAGE_EXTENSIONS + RASTER_EXTENSIONS))
        files = [images] if images.is_file() else sorted(p for p in images.iterdir() if p.suffix.lower() in exts)
        if not files:
            raise FileNotFoundError(f"{images}: no images ({', '.join(exts)})")
        for f in files:  # every input checked before the first output is written
            bands, value_range = self.raster_options()
            if bands is not None or (f.suffix.lower() in RASTER_EXTENSIONS and have_rasterio()):
                r = RasterReader(f, bands, value_range)
                r.check()
                r.close()
            else:
                check_image_file(f)
        written = []
        files = files[rank::world]
        with progress_bar("predicting", len(files), enabled=progress and rank == 0) as adv:
            for f in files:
                reader = open_reader(f, *self.raster_options())
                if getattr(reader, "georeferenced", False) or getattr(reader, "tiled", False):
                    sink = GeoTiffSink(out / f"{f.stem}.tif", reader, self.palette, confidence=confidence)
                    try:
                        self.predict(reader, sink=sink)
                    except BaseException:
                        sink.abort()
                        raise
                    written.append(sink.close())
                    if vector:
                        written.append(out / f"{f.stem}.{vector}")
                        polygonize(written[-2], written[-1], self.classes, min_area=min_area, simplify=simplify)
                    adv()
                    continue
                pred = self.predict(reader)
                path = out / f"{f.stem}.png"
                write_label(path, pred.labels, self.palette)
                if overlays:
                    img = reader.read(0, 0, reader.height, reader.width) if not hasattr(reader, "array") else np.asarray(reader.array)
                    ov = out / "overlays" / f"{f.stem}.jpg"
                    ov.parent.mkdir(parents=True, exist_ok=True)
                    tmp = ov.with_name(f".{ov.name}.tmp.jpg")
                    Image.fromarray(self.overlay(img, pred.labels)).save(tmp, quality=90)
                    tmp.replace(ov)
                written.append(path)
                adv()
        return written

    def _predict_instance_folder(self, images: Path, out: Path, *, overlays: bool, progress: bool) -> list[Path]:
        """Instance run: ``<id>.png`` 16-bit instance ids (0 = background, 1 = the most confident
        instance), ``instances.json`` (COCO results format: RLE masks, boxes, scores, with an
        ``images`` list naming each file) and ``overlays/<id>.jpg`` (one colour per instance)."""
        from PIL import Image

        from ..eval.instances import coco_results, instance_overlay
        from ..utils import atomic_write_json

        files = [images] if images.is_file() else sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"{images}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        for f in files:
            check_image_file(f)
        written, entries, results = [], [], []
        with progress_bar("predicting", len(files), enabled=progress) as adv:
            for i, f in enumerate(files, start=1):
                reader = open_reader(f, *self.raster_options())
                img = reader.read(0, 0, reader.height, reader.width)
                inst = self.predict_instances(img)
                ids = inst.id_map()
                write_label(out / f"{f.stem}.png", ids, sixteen_bit=True)
                entries.append({"id": i, "file_name": f.name, "height": int(ids.shape[0]), "width": int(ids.shape[1]), "instances": len(inst)})
                results.extend(coco_results(i, inst))
                if overlays:
                    ov = out / "overlays" / f"{f.stem}.jpg"
                    ov.parent.mkdir(parents=True, exist_ok=True)
                    tmp = ov.with_name(f".{ov.name}.tmp.jpg")
                    Image.fromarray(instance_overlay(img, ids)).save(tmp, quality=90)
                    tmp.replace(ov)
                written.append(out / f"{f.stem}.png")
                adv()
        categories = [{"id": k + 1, "name": c} for k, c in enumerate(self.classes)]
        atomic_write_json(out / "instances.json", {"images": entries, "categories": categories, "annotations": results})
        written.append(out / "instances.json")
        return written


class Run(Predictor):
    """A model with its classes, palette and evaluation settings.

    Attributes: ``model`` (the evaluated network: the teacher for EMA/momentum teachers),
    ``classes``, ``palette``, ``config`` (the training config when known), ``run_dir``,
    ``precision`` (the resolved :class:`~lowlabel.precision.Precision` that evaluation and
    prediction run in: ``precision`` if given, else the config's ``eval.precision``, whose
    ``auto`` follows ``train.precision``; see :func:`lowlabel.config.eval_precision`),
    ``checkpoint`` (the file :meth:`load` read; None for a run built in memory).
    """

    checkpoint: Path | None = None

    def __init__(self, model, classes, palette, *, config: Config | None = None, run_dir: Path | None = None, device="cpu", data_root=None,
                 precision: str | None = None):
        self.model = model.to(device).eval()
        self.classes, self.palette = list(classes), [tuple(c) for c in palette]
        self.config, self.run_dir, self.device = config, run_dir, torch.device(device)
        self.precision = resolve_precision(precision or eval_precision(config), self.device, model=self.model, setting="precision",
                                           channels_last=config.train.channels_last if config else "auto")
        self.precision.prepare(self.model)
        self.data_root = data_root
        self.eval_cfg = config.eval if config else EvalConfig()
        self.task = getattr(model, "task", "semantic")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", precision: str | None = None) -> "Run":
        """From a run directory (its best checkpoint, else its last) or a checkpoint file;
        ``precision`` (auto / fp32 / bf16 / fp16) overrides the run's evaluation precision."""
        path = Path(path)
        run_dir = None
        if path.is_dir():
            run_dir = path
            for name in ("best.pt", "last.pt"):
                if (path / "checkpoints" / name).is_file():
                    path = path / "checkpoints" / name
                    break
            else:
                raise FileNotFoundError(f"{path}: no checkpoints/best.pt or last.pt in this run directory")
        state = read_checkpoint(path)
        spec = state["model_spec"]
        model = build_model(spec["arch"], spec["encoder"], spec["num_classes"], width=spec.get("width", 16), in_channels=spec.get("in_channels", 3),
                            options=spec.get("options"))
        if "weights" in state:
            weights = state["weights"]
        elif state.get("evaluated") == "teacher" and state.get("teacher"):
            weights = state["teacher"]["model"]
        else:
            weights = state["student"]
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(path, f"weights do not fit {spec['arch']}/{spec['encoder']}: {str(err).splitlines()[0][:200]}") from None
        cfg = Config.model_validate(state["config"]) if state.get("config") else None
        meta = state["dataset"]
        run = cls(model, meta["classes"], meta["palette"], config=cfg, run_dir=run_dir or path.parent.parent, device=resolve_device(device), data_root=meta.get("root"),
                  precision=precision)
        run.checkpoint = path
        return run

    def retrieve(self, exemplar: np.ndarray | str | Path, exemplar_mask: np.ndarray | str | Path, queries, out: str | Path | None = None,
                 *, overlays: bool = True) -> list[np.ndarray]:
        """Zero-shot exemplar retrieval with an SSR-SAM run (``model.arch: ssr-sam``): segment, in
        every query image (arrays or files; a folder is read whole), what the exemplar's masked
        region (mask: non-zero pixels) shows, whatever its category. Returns one bool mask per
        query; with ``out``, writes ``<id>.png`` (0 / 1, palette) and ``overlays/<id>.jpg``."""
        from ..data.dataset import read_image, read_label
        from ..models.ssr_sam import SSRSAM, Retriever

        if not isinstance(self.model, SSRSAM):
            raise ValueError(f"retrieve needs an SSR-SAM model (model.arch ssr-sam); this run's is {type(self.model).__name__}")
        ex = read_image(exemplar) if isinstance(exemplar, (str, Path)) else exemplar
        m = read_label(exemplar_mask) if isinstance(exemplar_mask, (str, Path)) else np.asarray(exemplar_mask)
        if m.shape != ex.shape[:2]:
            raise ValueError(f"exemplar mask {m.shape[1]}x{m.shape[0]} does not match its image {ex.shape[1]}x{ex.shape[0]}")
        side = self.model.img_size
        if max(ex.shape[:2]) > side:  # the exemplar enters the MSPG whole: shrink it to the encoder's side
            f = side / max(ex.shape[:2])
            size = (max(1, round(ex.shape[0] * f)), max(1, round(ex.shape[1] * f)))
        else:
            size = ex.shape[:2]
        x = torch.from_numpy(np.array(ex)).permute(2, 0, 1)[None].float().div(255).to(self.device)
        mask = torch.from_numpy((m > 0) & (m != 255)).to(self.device)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0
        net = Retriever(self.model, x, mask).eval()
        if isinstance(queries, (str, Path)):
            q = Path(queries)
            queries = sorted(p for p in q.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if q.is_dir() else [q]
        results = []
        out = Path(out) if out is not None else None
        for i, query in enumerate(queries):
            img = read_image(query) if isinstance(query, (str, Path)) else query
            e = self.eval_cfg
            labels = sliding_window(net, img, 2, tile=min(e.tile, side), overlap=e.overlap, weighting=e.weighting, batch_size=e.batch_size, device=self.device,
                                    precision=self.precision).labels
            results.append(labels == 1)
            if out is not None:
                name = Path(query).stem if isinstance(query, (str, Path)) else f"query_{i:04d}"
                out.mkdir(parents=True, exist_ok=True)
                write_label(out / f"{name}.png", labels.astype(np.uint8), [[0, 0, 0], [255, 64, 64]])
                if overlays:
                    (out / "overlays").mkdir(exist_ok=True)
                    blend = np.where((labels == 1)[..., None], (img * 0.5 + np.array([255, 64, 64]) * 0.5), img).astype(np.uint8)
                    Image.fromarray(blend).save(out / "overlays" / f"{name}.jpg", quality=92)
        return results

    def evaluate(self, data: str | Path | None = None, split: str = "test", progress: bool = False) -> dict:
        """mIoU, per-class IoU, Dice (pooled and per volume) and pixel accuracy on a labeled split
        of a folder dataset; for an instance run, mask AP / AP50 / AP75 and counting errors."""
        root = data or self.data_root
        if root is None:
            raise ValueError("give the dataset folder (--data)")
        bands, value_range = self.raster_options()
        info = require_valid(root, splits=[split], read_pixels=True, bands=bands, value_range=value_range)
        if info.num_classes != self.num_classes:
            raise DatasetError(root, f"dataset has {info.num_classes} classes, the model {self.num_classes}")
        ds = FolderDataset(root, split, labeled=True, info=info, bands=bands, value_range=value_range)
        if self.task == "instance":
            from ..eval.instances import evaluate_instances

            if info.task != "instance":
                raise DatasetError(root, f"an instance model is scored on an instance dataset; this one's task is {info.task!r}")
            out = evaluate_instances(self.model, ds, eval_cfg=self.eval_cfg.model_copy(update={"max_images": None}), device=self.device, progress=progress,
                                     precision=self.precision)
            out.update({"split": split, "dataset": info.name, "task": "instance"})
            return out
        scores = evaluate_model(self.model, ds, num_classes=self.num_classes, eval_cfg=self.eval_cfg.model_copy(update={"max_images": None}), device=self.device, progress=progress,
                                precision=self.precision)
        out = scores.summary(info.classes)
        out.update({"images": len(ds), "split": split, "dataset": info.name})
        return out

    def _unlabeled_ids(self, root) -> list[str]:
        """The run's unlabeled ids: ``splits/unlabeled.txt``, else (a labeled-only run) its train
        split minus ``splits/labeled.txt``."""
        from ..data.dataset import read_ids

        splits = self.run_dir / "splits" if self.run_dir else None
        if splits is not None and (splits / "unlabeled.txt").is_file():
            return read_ids(splits / "unlabeled.txt")
        if splits is not None and (splits / "labeled.txt").is_file() and self.config is not None:
            train = Path(root) / "splits" / f"{self.config.data.train_split}.txt"
            if train.is_file():
                labeled = set(read_ids(splits / "labeled.txt"))
                return [i for i in read_ids(train) if i not in labeled]
        raise FileNotFoundError(f"{self.run_dir}: no splits/unlabeled.txt, nor splits/labeled.txt and the config's train split, to tell its unlabeled images")

    def calibrate(self, data: str | Path | None = None, split: str = "test", *, unlabeled: bool = False, bins: int = 15, threshold: float = 0.95,
                  max_images: int | None = None, progress: bool = False) -> dict:
        """How far the evaluated model's confidences can be trusted (:mod:`lowlabel.eval.calibration`):
        ECE, the reliability bins, and what ``threshold`` keeps per class, on a labeled split, or with
        ``unlabeled`` on the run's own unlabeled images (``splits/unlabeled.txt``; for a labeled-only
        run, the images of its train split it did not train on), scored against their masks where
        the dataset has them: diagnostics of the pseudo-labels' source, as ``data.unlabeled_gt``,
        and for a labeled-only run what it would hand a student as a teacher. ``max_images``: N images spread evenly over the list (every k-th),
        so a long list of volumes' slices is sampled across its volumes."""
        from ..data.dataset import label_path
        from ..eval.calibration import Calibration

        if self.task == "instance":
            raise ValueError("calibrate scores a semantic model's per-pixel confidences; this run is an instance model (use evaluate)")
        root = data or self.data_root
        if root is None:
            raise ValueError("give the dataset folder (--data)")
        bands, value_range = self.raster_options()
        if unlabeled:
            all_ids = self._unlabeled_ids(root)
            if not all_ids:
                raise DatasetError(root, "the run has no unlabeled images (it trained on its whole train split): score a labeled split instead (--split val)")
            info = require_valid(root, bands=bands, value_range=value_range)
            ids = [s for s in all_ids if label_path(Path(root) / "masks", s).is_file()]
            if not ids:
                raise DatasetError(root, f"none of the run's {len(all_ids)} unlabeled images has a mask in masks/: nothing to score the confidences against")
            source = f"unlabeled ({len(ids)} of {len(all_ids)} with masks)"
        else:
            info = require_valid(root, splits=[split], read_pixels=True, bands=bands, value_range=value_range)
            ids, source = split, split
        if info.num_classes != self.num_classes:
            raise DatasetError(root, f"dataset has {info.num_classes} classes, the model {self.num_classes}")
        ds = FolderDataset(root, ids, labeled=True, info=info, bands=bands, value_range=value_range)
        picks = list(range(len(ds)))
        if max_images is not None and max_images < len(picks):
            picks = [int(i * len(ds) / max_images) for i in range(max(1, max_images))]
        n = len(picks)
        cal = Calibration(self.num_classes, bins=bins, threshold=threshold)
        predictor, e = for_eval(self.model, self.eval_cfg), self.eval_cfg
        with torch.no_grad(), progress_bar("calibrating", n, enabled=progress, transient=True) as adv:
            for i in picks:
                raw = ds.load(i)
                pred = sliding_window(predictor, raw["image"], self.num_classes, tile=e.tile, overlap=e.overlap, weighting=e.weighting, batch_size=e.batch_size,
                                      device=self.device, precision=self.precision)
                cal.update(pred.confidence.astype(np.float32), pred.labels, np.asarray(raw["mask"]))
                adv()
        out = cal.summary(info.classes)
        out.update({"split": source, "dataset": info.name, "checkpoint": str(self.checkpoint) if self.checkpoint else None})
        return out
