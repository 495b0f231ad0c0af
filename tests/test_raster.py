"""Georeferenced rasters in and out (rasterio): window reads, bands, scaling, nodata, GeoTIFF
predictions on the input's grid, bad rasters named. Inputs are real aerial tiles (the bundled
Dubai sample) written as tiled, compressed GeoTIFFs with an assigned CRS and transform."""

import numpy as np
import pytest
import torch
from PIL import Image

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

from lowlabel.data.dataset import DatasetError  # noqa: E402
from lowlabel.data.raster import RasterReader  # noqa: E402
from lowlabel.data.tiling import open_reader  # noqa: E402
from lowlabel.engine.run import Run  # noqa: E402

from .conftest import REPO  # noqa: E402

TILE = REPO / "src" / "lowlabel" / "sample_data" / "dubai-sample" / "images" / "tile2_part001.jpg"
CRS = "EPSG:32640"  # UTM 40N, where Dubai is
TRANSFORM = from_origin(330000.0, 2790000.0, 0.5, 0.5)


def _geotiff(path, array, *, nodata=None, dtype=None):
    """[bands, H, W] -> a tiled, DEFLATE-compressed GeoTIFF."""
    array = array.astype(dtype or array.dtype)
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0], dtype=array.dtype,
                       crs=CRS, transform=TRANSFORM, nodata=nodata, tiled=True, blockxsize=128, blockysize=128, compress="deflate") as ds:
        ds.write(array)
    return path


@pytest.fixture
def rgb():
    return np.moveaxis(np.asarray(Image.open(TILE).convert("RGB")), 2, 0)  # [3, H, W] uint8


def test_window_reads_equal_the_crop_of_a_full_read(tmp_path, rgb):
    r = open_reader(_geotiff(tmp_path / "a.tif", rgb))
    assert isinstance(r, RasterReader) and r.georeferenced and (r.height, r.width) == rgb.shape[1:]
    full = r.read(0, 0, r.height, r.width)
    assert np.array_equal(full, np.moveaxis(rgb, 0, 2))
    for y, x, h, w in ((0, 0, 64, 64), (37, 101, 90, 33), (r.height - 50, r.width - 70, 50, 70)):
        assert np.array_equal(r.read(y, x, h, w), full[y : y + h, x : x + w])


def test_band_selection_and_uint16_scaling(tmp_path, rgb):
    four = np.concatenate([rgb.astype(np.uint16) * 100, np.full_like(rgb[:1], 7, dtype=np.uint16)])  # RGB + "NIR", 16-bit
    path = _geotiff(tmp_path / "b.tif", four)
    r = RasterReader(path, bands=[3, 2, 1], value_range=(0, 25500))
    assert np.array_equal(r.read(10, 10, 20, 30), np.moveaxis(rgb[::-1, 10:30, 10:40], 0, 2))  # BGR order, scaled back
    auto = RasterReader(path)  # 2-98 % stretch of the first three bands
    lo, hi = auto.value_range
    assert 0 <= lo < hi <= 25500
    with pytest.raises(DatasetError, match="band"):
        RasterReader(path, bands=[5])


def _colour_run():
    """A "model" whose class is the image's dominant colour channel: varied, exact labels."""
    model = torch.nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3)[:, :, None, None])
    return Run(model, ["red", "green", "blue"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)])


def _scene_with_nodata(tmp_path, rgb):
    """in/scene.tif: the tile with a 40 x 60 nodata corner (0 in every band)."""
    src = tmp_path / "in"
    src.mkdir()
    rgb = rgb.copy()
    rgb[:, :40, :60] = 0
    _geotiff(src / "scene.tif", rgb, nodata=0)
    return src, rgb


def test_prediction_is_a_cog_on_the_input_grid(tmp_path, rgb):
    src, rgb = _scene_with_nodata(tmp_path, rgb)
    run = _colour_run()
    (out,) = run.predict_folder(src, tmp_path / "out", confidence=True)
    assert out.name == "scene.tif" and not list((tmp_path / "out").glob(".*"))  # no temporary left
    with rasterio.open(out) as ds, rasterio.open(src / "scene.tif") as ref:
        assert ds.crs == ref.crs and ds.transform == ref.transform and (ds.height, ds.width) == (ref.height, ref.width)
        assert ds.count == 2 and ds.nodata == 255 and ds.profile["tiled"]
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.colormap(1)[1][:3] == (0, 255, 0)
        labels = ds.read(1)
    expect = run.predict(np.moveaxis(rgb, 0, 2)).labels
    nodata = (rgb == 0).all(axis=0)
    assert len(np.unique(expect[~nodata])) == 3
    assert (labels[nodata] == 255).all()  # the input's nodata is not predicted
    assert np.array_equal(labels[~nodata], expect[~nodata])  # streamed rows == the in-memory prediction


def test_bad_rasters_are_named(tmp_path, rgb):
    good = _geotiff(tmp_path / "g.tif", rgb)
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(good.read_bytes()[:500])
    with pytest.raises(DatasetError, match="truncated.tif"):
        RasterReader(bad).check()
    cplx = tmp_path / "complex.tif"
    with rasterio.open(cplx, "w", driver="GTiff", height=8, width=8, count=1, dtype="complex64", crs=CRS, transform=TRANSFORM) as ds:
        ds.write(np.zeros((1, 8, 8), np.complex64))
    with pytest.raises(DatasetError, match="unsupported data type"):
        RasterReader(cplx)
    empty = _geotiff(tmp_path / "empty.tif", np.zeros((3, 16, 16), np.uint16), nodata=0)
    with pytest.raises(DatasetError, match="nodata"):
        RasterReader(empty)
    empty8 = _geotiff(tmp_path / "empty8.tif", np.zeros((3, 16, 16), np.uint8), nodata=0)
    with pytest.raises(DatasetError, match="empty8.tif.*every pixel is nodata"):
        RasterReader(empty8).check()
    RasterReader(_geotiff(tmp_path / "some8.tif", np.pad(np.ones((3, 2, 2), np.uint8), ((0, 0), (7, 7), (7, 7))), nodata=0)).check()


def test_predict_refuses_a_truncated_raster_before_writing(tmp_path, rgb, capsys):
    from lowlabel.cli import main

    src = tmp_path / "in"
    src.mkdir()
    _geotiff(src / "a.tif", rgb)
    good = _geotiff(tmp_path / "b.tif", rgb)
    (src / "b.tif").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    from lowlabel.engine.trainer import CHECKPOINT_FORMAT
    from lowlabel.models import build_model
    from lowlabel.utils import atomic_torch_save

    ckpt = tmp_path / "run"
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "model_spec": {"arch": "tiny", "encoder": "tiny", "num_classes": 3, "width": 4, "in_channels": 3},
                       "weights": build_model("tiny", "tiny", 3, width=4).state_dict(),
                       "dataset": {"classes": ["r", "g", "b"], "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255]]}}, ckpt / "best.pt")
    assert main(["predict", str(ckpt / "best.pt"), str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "b.tif" in err and "truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["gpkg", "geojson"])
def test_vector_polygons_cover_exactly_the_predicted_pixels(tmp_path, rgb, fmt):
    import pyogrio
    from rasterio.features import rasterize
    from shapely import from_wkb

    src, rgb = _scene_with_nodata(tmp_path, rgb)
    run = _colour_run()
    tif, vec = run.predict_folder(src, tmp_path / "out", vector=fmt)
    assert vec.name == f"scene.{fmt}"
    with rasterio.open(tif) as ds:
        labels, shape, transform = ds.read(1), (ds.height, ds.width), ds.transform
    info = pyogrio.read_info(vec)
    assert info["crs"] is not None and info["features"] > 0
    _, _, geoms, fields = pyogrio.raw.read(vec)
    class_ids = fields[0]
    burned = rasterize(((from_wkb(g), int(c)) for g, c in zip(geoms, class_ids)), out_shape=shape, transform=transform, fill=255, dtype="uint8")
    assert np.array_equal(burned, labels)  # every predicted pixel in exactly its class's polygons, nodata in none
    few = run.predict_folder(src, tmp_path / "out2", vector=fmt, min_area=50.0, simplify=1.0)[1]  # 50 m² = 200 pixels
    assert 0 < pyogrio.read_info(few)["features"] < info["features"]


def test_training_on_selected_bands_of_16_bit_rasters(tmp_path, rgb):
    """A folder dataset of 4-band uint16 GeoTIFFs (band 4 = "NIR" noise) trains on bands [3, 2, 1]
    with a fixed value range; evaluation and prediction read the same bands."""
    import json

    from lowlabel.api import fit
    from lowlabel.config import load_config
    from lowlabel.data.dataset import FolderDataset

    from .conftest import make_dataset, tiny_config

    src = make_dataset(tmp_path / "png")
    root = tmp_path / "geo"
    (root / "images").mkdir(parents=True)
    for p in sorted((src / "images").glob("*.png")):
        img = np.moveaxis(np.asarray(Image.open(p).convert("RGB")), 2, 0).astype(np.uint16) * 100
        nir = np.random.default_rng(0).integers(0, 25500, img.shape[1:], dtype=np.uint16)[None]
        _geotiff(root / "images" / f"{p.stem}.tif", np.concatenate([img[::-1], nir]))  # stored as B, G, R, NIR
    for d in ("masks", "splits"):
        (root / d).symlink_to(src / d)
    (root / "dataset.json").write_text((src / "dataset.json").read_text())
    ds = FolderDataset(root, "train", bands=[3, 2, 1], value_range=(0, 25500))
    assert np.array_equal(ds.load(0)["image"], np.asarray(Image.open(src / "images" / "img00.png").convert("RGB")))
    raw = tiny_config(root, tmp_path / "runs", "supervised", "none", iterations=2, data={"bands": [3, 2, 1], "value_range": [0, 25500]})
    run = fit(load_config(raw=raw), progress=False)
    assert run.raster_options() == ([3, 2, 1], (0.0, 25500.0))
    assert run.evaluate(split="test")["images"] == 1
    (out,) = run.predict_folder(root / "images" / "img05.tif", tmp_path / "pred")
    assert out.suffix == ".tif"  # georeferenced in, georeferenced out
    png_run_pred = run.predict(np.asarray(Image.open(src / "images" / "img05.png").convert("RGB"))).labels
    with rasterio.open(out) as o:
        assert np.array_equal(o.read(1), png_run_pred)
    with pytest.raises(ValueError, match="model.in_channels: 4"):
        load_config(raw={**raw, "data": {**raw["data"], "bands": [1, 2, 3, 4]}})
    with pytest.raises(ValueError, match="list them in data.bands"):
        load_config(raw={**raw, "model": {**raw["model"], "in_channels": 4}})
    assert json.loads((tmp_path / "runs" / raw["name"] / "run.json").read_text())["dataset"] == "png"


def test_training_reads_a_window_of_each_raster_not_the_whole(tmp_path, rgb, monkeypatch):
    """data.window: a training sample of a GeoTIFF mosaic reads one window of ceil(crop / scale_min)
    pixels (image through rasterio, label map through GDAL), equal to the same crop of the full
    read; the random rescale + crop then runs on that window. A mask of another size is named."""
    import json

    from lowlabel.api import fit
    from lowlabel.config import load_config
    from lowlabel.data.dataset import FolderDataset, read_label, write_label
    from lowlabel.engine.data import build_sets

    from .conftest import tiny_config

    root = tmp_path / "mosaic"
    for d in ("images", "masks", "splits"):
        (root / d).mkdir(parents=True)
    mosaic = np.concatenate([np.concatenate([rgb, rgb[:, ::-1]], 2)] * 2, 1)  # 2 x 2 tiles
    mask = (mosaic[0] > mosaic[1]).astype(np.uint8) + (mosaic[2] > 150)
    for i in range(4):
        _geotiff(root / "images" / f"m{i}.tif", np.roll(mosaic, 97 * i, axis=2))
        write_label(root / "masks" / f"m{i}.png", np.roll(mask, 97 * i, axis=1), [[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    (root / "dataset.json").write_text(json.dumps({"name": "mosaic", "classes": ["a", "b", "c"]}))
    for split, ids in (("train", "m0\nm1\nm2\n"), ("val", "m3\n"), ("test", "m3\n")):
        (root / "splits" / f"{split}.txt").write_text(ids)
    H, W = mosaic.shape[1:]

    ds = FolderDataset(root, "train", window=64)
    whole = ds.load(1)
    for win in ((0, 0, 64, 64), (H - 64, W - 64, 64, 64), (101, 37, 64, 64)):
        part = ds.load(1, win)
        y, x, h, w = win
        assert np.array_equal(part["image"], whole["image"][y:y + h, x:x + w])
        assert np.array_equal(part["mask"], whole["mask"][y:y + h, x:x + w])

    reads = []
    real = RasterReader.read
    monkeypatch.setattr(RasterReader, "read", lambda self, y, x, h, w: reads.append((h, w)) or real(self, y, x, h, w))
    raw = tiny_config(root, tmp_path / "runs", "supervised", "none", iterations=2, data={"window": True, "crop": 32, "scale": [0.5, 2.0]})
    lab, _ = build_sets(load_config(raw=raw).data, 0, 0, False)
    s = lab[0]
    assert reads == [(64, 64)] and s["image"].shape[-2:] == (32, 32)  # one 64 x 64 window (32 / 0.5), never the 2 x 2 mosaic
    reads.clear()
    fit(load_config(raw=raw), progress=False)
    train_reads = [r for r in reads if r == (64, 64)]
    assert len(train_reads) >= 2 * raw["data"]["labeled_batch"] and all(r in ((64, 64), (H, W)) for r in reads)  # evaluation reads whole tiles

    nod = np.roll(mosaic, 97 * 2, axis=2).copy()
    nod[:, :40, :60] = 0
    _geotiff(root / "images" / "m2.tif", nod, nodata=0)  # a nodata corner: its pixels carry no label
    got = ds.load(2, (0, 0, 64, 64))["mask"]
    assert (got[:40, :60] == 255).all() and np.array_equal(got[40:], np.roll(mask, 97 * 2, axis=1)[40:64, :64])

    write_label(root / "masks" / "m0.png", mask[:-1], [[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    with pytest.raises(DatasetError, match="does not match its image"):
        ds.load(0, (0, 0, 64, 64))
    assert read_label(root / "masks" / "m1.png").shape == (H, W)
    from lowlabel.errors import ConfigError

    with pytest.raises(ConfigError, match="data.window"):
        build_sets(load_config(raw={**raw, "data": {**raw["data"], "resize": True}}).data, 0, 0, False)


def test_whole_slide_tiff_without_crs_gives_a_tiled_tiff(tmp_path, rgb):
    """A pyramidal, tiled TIFF without georeferencing (a whole slide) is read by window and
    predicted into a tiled TIFF on its pixel grid (no CRS), equal to the prediction of the same
    pixels as a PNG; a plain strip TIFF still gives a PNG."""
    run = _colour_run()
    src = tmp_path / "in"
    src.mkdir()
    with rasterio.open(src / "slide.tif", "w", driver="GTiff", height=rgb.shape[1], width=rgb.shape[2], count=3, dtype="uint8",
                       tiled=True, blockxsize=128, blockysize=128, compress="jpeg") as ds:
        ds.write(rgb)
    with rasterio.open(src / "slide.tif", "r+") as ds:
        ds.build_overviews([2, 4])
    Image.fromarray(np.moveaxis(rgb, 0, 2)).save(src / "plain.tif")  # PIL: strips, no tiles
    written = run.predict_folder(src, tmp_path / "pred")
    assert sorted(p.name for p in written) == ["plain.png", "slide.tif"]
    with rasterio.open(tmp_path / "pred" / "slide.tif") as o, rasterio.open(src / "slide.tif") as i:
        assert o.crs is None and o.block_shapes[0] == (256, 256) and o.overviews(1)  # tiled, with overviews (COG)
        assert (o.height, o.width) == (i.height, i.width)
        slide_labels = o.read(1)
        pixels = i.read()
    expected = run.predict(np.ascontiguousarray(np.moveaxis(pixels, 0, 2))).labels
    assert np.array_equal(slide_labels, expected)


def _nir_only_dataset(root):
    """4-band GeoTIFFs whose RGB bands are noise and whose band 4 ("NIR") alone shows the class
    (random blocks per image, so neither colour nor position gives it away)."""
    rng = np.random.default_rng(0)
    for d in ("images", "masks", "splits"):
        (root / d).mkdir(parents=True)
    ids = [f"img{i:02d}" for i in range(8)]
    for i in ids:
        mask = np.zeros((48, 64), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 40), rng.integers(0, 56)
            mask[y : y + rng.integers(8, 24), x : x + rng.integers(8, 24)] = rng.integers(1, 3)
        noise = rng.integers(0, 256, (3, 48, 64))
        nir = (mask * 100 + rng.integers(0, 30, mask.shape))[None]
        _geotiff(root / "images" / f"{i}.tif", np.concatenate([noise, nir]).astype(np.uint8))
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "splits" / "train.txt").write_text("\n".join(ids[:6]) + "\n")
    (root / "splits" / "val.txt").write_text(ids[6] + "\n")
    (root / "splits" / "test.txt").write_text(ids[7] + "\n")
    (root / "dataset.json").write_text('{"name": "nir", "task": "semantic", "classes": ["a", "b", "c"]}')
    return root


def test_a_fourth_band_reaches_the_network(tmp_path):
    """data.bands [1, 2, 3, 4] + model.in_channels 4: the network sees band 4, the only band that
    shows the class, and segments the test image; on bands [1, 2, 3] the same run cannot. The
    4-band run's prediction of a GeoTIFF reads the same four bands."""
    from lowlabel.api import fit
    from lowlabel.config import load_config

    from .conftest import tiny_config

    root = _nir_only_dataset(tmp_path / "nir")
    scores = {}
    for bands in ([1, 2, 3, 4], [1, 2, 3]):
        raw = tiny_config(root, tmp_path / "runs", "supervised", "none", iterations=150, name=f"b{len(bands)}",
                          data={"labeled": "1", "bands": bands}, model={"in_channels": len(bands)}, train={"val_every": 150, "checkpoint_every": 150})
        run = fit(load_config(raw=raw), progress=False)
        scores[len(bands)] = run.evaluate(split="test")["miou"]
        if len(bands) == 4:
            assert run.model.in_channels == 4
            (out,) = run.predict_folder(root / "images" / "img07.tif", tmp_path / "pred")
            with rasterio.open(out) as o, rasterio.open(root / "images" / "img07.tif") as src:
                assert np.array_equal(o.read(1), run.predict(np.moveaxis(src.read(), 0, 2)).labels)
    assert scores[4] > 0.6 and scores[4] > scores[3] + 0.3, scores  # measured: 0.74 and 0.26


@pytest.mark.parametrize("method", ["fixmatch", "unimatch", "regionmatch", "derprop"])
def test_semi_supervised_methods_train_on_four_bands(tmp_path, method):
    """Every semi-supervised method's views (strong photometric ones, CutMix, feature
    perturbations) work on 4-band images."""
    from lowlabel.api import fit
    from lowlabel.config import load_config

    from .conftest import tiny_config

    root = _nir_only_dataset(tmp_path / "nir")
    raw = tiny_config(root, tmp_path / "runs", method, "self", iterations=2, data={"bands": [1, 2, 3, 4]}, model={"in_channels": 4})
    run = fit(load_config(raw=raw), progress=False)
    assert run.model.in_channels == 4 and 0 <= run.evaluate(split="test")["miou"] <= 1


def test_gdal_block_cache_is_capped_unless_the_user_sets_it(tmp_path, rgb, monkeypatch):
    """GDAL's default block cache (5 % of RAM) would grow with the raster read; lowlabel caps it."""
    from lowlabel.data.raster import GDAL_CACHE_BYTES

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    rasterio.env.set_gdal_config("GDAL_CACHEMAX", 2 * GDAL_CACHE_BYTES)
    RasterReader(_geotiff(tmp_path / "a.tif", rgb)).close()
    assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == GDAL_CACHE_BYTES
    monkeypatch.setenv("GDAL_CACHEMAX", "512")
    rasterio.env.set_gdal_config("GDAL_CACHEMAX", 2 * GDAL_CACHE_BYTES)
    RasterReader(tmp_path / "a.tif").close()
    assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == 2 * GDAL_CACHE_BYTES


def _geo_dataset(root, src):
    """The tiny PNG dataset ``src`` as GeoTIFF scenes with GeoTIFF label rasters on their grid."""
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True)
    for p in sorted((src / "images").glob("*.png")):
        _geotiff(root / "images" / f"{p.stem}.tif", np.moveaxis(np.asarray(Image.open(p).convert("RGB")), 2, 0))
        _geotiff(root / "masks" / f"{p.stem}.tif", np.asarray(Image.open(src / "masks" / f"{p.stem}.png"))[None])
    (root / "splits").symlink_to(src / "splits")
    (root / "dataset.json").write_text((src / "dataset.json").read_text())
    return root


def test_label_geotiffs_on_the_image_grid_train_and_score(tmp_path):
    """masks/<id>.tif (a label raster from a GIS) is read like a PNG mask; a run trains on it, and
    `evaluate` scores `predict`'s GeoTIFF output against it (255 = not predicted is left out and
    counted). A label raster in another CRS, off the image's grid, or of floats is named."""
    from rich.console import Console

    from lowlabel.api import fit
    from lowlabel.config import load_config
    from lowlabel.data.dataset import FolderDataset
    from lowlabel.data.validate import validate_dataset
    from lowlabel.eval.evaluate import evaluate_folder, metrics_table

    from .conftest import make_dataset, tiny_config

    src = make_dataset(tmp_path / "png")
    root = _geo_dataset(tmp_path / "geo", src)
    assert validate_dataset(root).problems == []
    ds = FolderDataset(root, "train")
    assert np.array_equal(ds.load(0)["mask"], np.asarray(Image.open(src / "masks" / "img00.png")))
    run = fit(load_config(raw=tiny_config(root, tmp_path / "runs", "supervised", "none", iterations=20)), progress=False)
    (pred,) = run.predict_folder(root / "images" / "img05.tif", tmp_path / "pred", confidence=True)  # band 2: confidence
    assert pred.suffix == ".tif"
    scores = evaluate_folder(tmp_path / "pred", root, "test")
    assert scores["miou"] == pytest.approx(run.evaluate(split="test")["miou"], abs=1e-6) and scores["unpredicted_pixels"] == 0
    with rasterio.open(pred, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as o:  # a nodata corner: not predicted
        o.write(np.full((10, 10), 255, np.uint8), 1, window=rasterio.windows.Window(0, 0, 10, 10))
    mask = np.asarray(Image.open(src / "masks" / "img05.png"))
    summary = evaluate_folder(tmp_path / "pred", root, "test")
    assert summary["unpredicted_pixels"] == int((mask[:10, :10] != 255).sum()) > 0
    con = Console(record=True, width=120)
    con.print(metrics_table(summary))
    text = con.export_text()
    assert "not predicted (px, left out)" in text and f"{summary['unpredicted_pixels']:,}" in text

    m = root / "masks" / "img01.tif"
    arr = np.asarray(Image.open(src / "masks" / "img01.png"))[None]
    for bad, problem in ((dict(crs="EPSG:4326"), "CRS EPSG:4326 differs"), (dict(transform=from_origin(330001.0, 2790000.0, 0.5, 0.5)), "transform"),
                         (dict(dtype="float32"), "integer class ids")):
        with rasterio.open(m, "w", driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=1, dtype=bad.get("dtype", "uint8"),
                           crs=bad.get("crs", CRS), transform=bad.get("transform", TRANSFORM)) as d:
            d.write(arr.astype(bad.get("dtype", "uint8")))
        found = [p for p in validate_dataset(root).problems if p.path.endswith("img01.tif")]
        assert len(found) == 1 and problem in found[0].problem, (problem, found)
        with pytest.raises(DatasetError, match=problem):
            FolderDataset(root, "train").load(1)
