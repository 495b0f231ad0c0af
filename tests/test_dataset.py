import json

import numpy as np
import pytest
from PIL import Image

from lowlabel.data.dataset import DatasetError, DatasetInfo, FolderDataset, read_image, write_label
from lowlabel.data.validate import require_valid, validate_dataset
from lowlabel.sample_data import sample_path

from .conftest import make_dataset


def test_bundled_sample_is_valid_and_small():
    report = validate_dataset(sample_path())
    assert report.ok, report.problems
    assert report.checked_images == 12
    size = sum(p.stat().st_size for p in sample_path().rglob("*") if p.is_file())
    assert size < 5 * 2**20
    assert "source" in json.loads((sample_path() / "dataset.json").read_text())


def test_sample_fields_and_grey_expansion(tmp_path):
    root = make_dataset(tmp_path / "g", grey=True)
    ds = FolderDataset(root, "train")
    s = ds[0]
    assert s["image"].shape == (3, 48, 64) and s["image"].dtype.is_floating_point
    assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 1
    assert s["mask"].shape == (48, 64) and int(s["mask"][0, 0]) == 255
    assert (s["image"][0] == s["image"][1]).all()  # grey -> 3 equal channels
    unl = FolderDataset(root, "train", labeled=False)
    assert "mask" not in unl[0]


def test_unlabeled_images_need_no_mask(tiny_dataset):
    (tiny_dataset / "masks" / "img00.png").unlink()
    assert validate_dataset(tiny_dataset).ok
    assert "mask" not in FolderDataset(tiny_dataset, ["img00"], labeled=False)[0]
    with pytest.raises(DatasetError, match="img00.png"):
        FolderDataset(tiny_dataset, ["img00"], labeled=True)[0]


def _problems(root, **kw):
    return [str(p) for p in validate_dataset(root, **kw).problems]


def test_size_mismatch_is_reported(tiny_dataset):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tiny_dataset / "masks" / "img01.png")
    probs = _problems(tiny_dataset)
    assert any("img01.png" in p and "does not match" in p for p in probs)
    with pytest.raises(DatasetError, match="does not match"):
        FolderDataset(tiny_dataset, ["img01"]).load(0)


def test_class_ids_out_of_range(tiny_dataset):
    m = np.full((48, 64), 7, np.uint8)
    Image.fromarray(m).save(tiny_dataset / "masks" / "img02.png")
    probs = _problems(tiny_dataset)
    assert any("img02.png" in p and "class ids [7]" in p for p in probs)


def test_split_ids_without_image(tiny_dataset):
    with open(tiny_dataset / "splits" / "train.txt", "a") as f:
        f.write("ghost\n")
    probs = _problems(tiny_dataset)
    assert any("train.txt" in p and "ghost" in p for p in probs)
    with pytest.raises(DatasetError, match="ghost"):
        require_valid(tiny_dataset)


def test_truncated_and_unreadable_images(tiny_dataset):
    data = (tiny_dataset / "images" / "img03.png").read_bytes()
    (tiny_dataset / "images" / "img03.png").write_bytes(data[: len(data) // 2])
    (tiny_dataset / "images" / "img04.png").write_bytes(b"not an image at all")
    probs = _problems(tiny_dataset)
    assert any("img03.png" in p and "truncated" in p for p in probs)
    assert any("img04.png" in p and "unreadable" in p for p in probs)
    with pytest.raises(DatasetError, match="img03.png"):
        read_image(tiny_dataset / "images" / "img03.png")


def test_dataset_json_problems(tiny_dataset):
    (tiny_dataset / "dataset.json").write_text("{not json")
    assert "does not parse" in _problems(tiny_dataset)[0]
    (tiny_dataset / "dataset.json").write_text(json.dumps({"name": "x", "classes": []}))
    assert "lacks 'classes'" in _problems(tiny_dataset)[0]
    (tiny_dataset / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json"):
        DatasetInfo.load(tiny_dataset)


def test_empty_labeled_set(tiny_dataset, tmp_path):
    empty = tmp_path / "labeled.txt"
    empty.write_text("\n")
    probs = _problems(tiny_dataset, extra_split_files=[empty])
    assert any("empty labeled set" in p for p in probs)


def test_all_problems_reported_at_once(tiny_dataset):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tiny_dataset / "masks" / "img01.png")
    Image.fromarray(np.full((48, 64), 9, np.uint8)).save(tiny_dataset / "masks" / "img02.png")
    assert len(_problems(tiny_dataset)) == 2


def test_write_label_is_atomic_and_keeps_indices(tmp_path):
    lab = np.array([[0, 1], [2, 255]], np.uint8)
    write_label(tmp_path / "x.png", lab, [(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    back = np.asarray(Image.open(tmp_path / "x.png"))
    assert (back == lab).all()
    assert not list(tmp_path.glob(".*tmp"))


def test_instance_dataset_reads_16bit_ids(tmp_path):
    root = make_dataset(tmp_path / "inst", classes=("nucleus",))
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "task": "instance"}))
    (root / "instances").mkdir()
    for p in (root / "images").iterdir():
        inst = np.zeros((48, 64), np.uint16)
        inst[5:10, 5:10] = 300  # ids above 255 need 16 bits
        inst[20:30, 40:50] = 2
        Image.fromarray(inst).save(root / "instances" / f"{p.stem}.png")
    assert validate_dataset(root).ok
    s = FolderDataset(root, "train")[0]
    assert set(np.unique(s["instances"].numpy())) == {0, 2, 300}
    assert s["mask"].sum() == 25 + 100  # foreground of the instances
