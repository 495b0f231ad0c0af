"""Export (lowlabel.export): ONNX and TorchScript files of a run's model agree with torch, keep
dynamic batch and image sizes (pad-to-stride and crop inside the graph), predict like the run,
and bad input fails with one line.

The ONNX tests need onnxruntime (the export extra, in the test extra); they skip where it is
missing, except under CI (CI=true), where they run and fail."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lowlabel.cli import main
from lowlabel.engine.run import Run
from lowlabel.errors import CheckpointError, ConfigError, ExportError
from lowlabel.export import ExportedModel, export_run, load_exported, looks_exported, metadata_path, read_metadata
from lowlabel.models import build_model
from lowlabel.sample_data import sample_path

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAVE_ORT and not os.environ.get("CI"), reason="onnxruntime is not installed (pip install 'lowlabel[export]')")

SAMPLE = sample_path()
TEST_IDS = (SAMPLE / "splits" / "test.txt").read_text().split()
CLASSES = ["building", "land", "road", "vegetation", "water"]
PALETTE = [(60, 16, 152), (132, 41, 246), (110, 193, 228), (254, 221, 58), (226, 169, 41)]


def sample_image(i: int = 0) -> np.ndarray:
    return np.array(Image.open(next((SAMPLE / "images").glob(f"{TEST_IDS[i]}.*"))).convert("RGB"))


def sample_crop(h: int, w: int, i: int = 0, y: int = 40, x: int = 60) -> torch.Tensor:
    """float [1, 3, h, w] in [0, 1]: a crop of a test image of the bundled sample."""
    return torch.from_numpy(sample_image(i)[y : y + h, x : x + w]).permute(2, 0, 1)[None].float().div(255)


def random_run(arch: str, seed: int = 0, **kw) -> Run:
    torch.manual_seed(seed)
    return Run(build_model(arch, "resnet18", len(CLASSES), **kw), CLASSES, PALETTE, precision="fp32")


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The quickstart's run (UniMatch, tiny network, the bundled sample), 2 iterations."""
    from lowlabel.api import fit
    from lowlabel.quickstart import quickstart_config

    return fit(quickstart_config(tmp_path_factory.mktemp("export-run"), iterations=2), progress=False).run_dir


@pytest.fixture(scope="module")
def test_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("export-images")
    for i in TEST_IDS:
        shutil.copy(next((SAMPLE / "images").glob(f"{i}.*")), d)
    return d


@needs_ort
@pytest.mark.parametrize("arch,kw", [("tiny", {"width": 8}), ("unet2d", {"width": 8, "in_channels": 1}), ("deeplabv3plus", {})],
                         ids=["tiny", "unet2d-grey", "deeplabv3plus"])
def test_onnx_logits_agree_with_torch_on_the_sample_at_two_sizes(tmp_path, arch, kw):
    import onnxruntime as ort

    run = random_run(arch, **kw)
    out = export_run(run, "onnx", tmp_path / f"{arch}.onnx")
    assert not run.model.training  # the exporter switches modes on a copy, never on the run's model
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # one file, two batches of different sizes, neither a multiple of the stride (16 or 32)
    for x in (sample_crop(150, 203), torch.cat([sample_crop(97, 130, i=0), sample_crop(97, 130, i=1)])):
        with torch.no_grad():
            ref = run.model(x)
        got = sess.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == tuple(ref.shape) == (x.shape[0], len(CLASSES), *x.shape[-2:])
        assert np.abs(got - ref.numpy()).max() < 1e-3
    meta = read_metadata(out)
    assert meta["input"]["channels"] == 3 and meta["input"]["batch"] == "dynamic" and meta["input"]["min_size"] == run.model.size_divisor
    assert meta["verified"]["max_abs_logit_diff"] < 1e-3


@needs_ort
def test_onnx_graph_declares_dynamic_batch_height_width(tmp_path):
    import onnx

    out = export_run(random_run("tiny", width=4), "onnx", tmp_path / "m.onnx", opset=17)
    model = onnx.load(str(out))
    (inp,), (outp,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and outp.name == "logits"
    assert isinstance(dims[0], str) and dims[1] == 3 and isinstance(dims[2], str) and isinstance(dims[3], str)
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in model.opset_import)
    assert read_metadata(out)["opset"] == 17


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")  # a user loads it with plain torch
def test_torchscript_logits_agree_with_torch_at_two_sizes(tmp_path):
    run = random_run("tiny", width=8)
    out = export_run(run, "torchscript", tmp_path / "m.pt")
    module = torch.jit.load(str(out))
    for x in (sample_crop(150, 203), torch.cat([sample_crop(64, 80), sample_crop(64, 80, i=1), sample_crop(64, 80, y=0)])):
        with torch.no_grad():
            assert (module(x) - run.model(x)).abs().max() < 1e-4
    assert read_metadata(out)["model_format"] == "torchscript" and read_metadata(out)["opset"] is None
    assert looks_exported(out)


@needs_ort
def test_exported_model_pads_images_smaller_than_the_stride_as_the_network_does(tmp_path):
    run = random_run("deeplabv3plus")  # stride 32
    model = ExportedModel(export_run(run, "onnx", tmp_path / "m.onnx"))
    for h, w in ((10, 20), (20, 45), (5, 5)):  # replicate, reflect with one side short, replicate
        x = sample_crop(h, w)
        with torch.no_grad():
            assert (model(x) - run.model(x)).abs().max() < 1e-3


@needs_ort
def test_cli_export_then_predict_gives_the_runs_label_maps(sample_run, test_images, tmp_path, capsys):
    f = tmp_path / "sample.onnx"
    assert main(["export", str(sample_run), "--format", "onnx", "--out", str(f)]) == 0
    assert "verified against torch" in capsys.readouterr().out
    meta = json.loads(metadata_path(f).read_text())
    best = sample_run / "checkpoints" / "best.pt"
    assert meta["source"]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert meta["classes"] == CLASSES and [tuple(c) for c in meta["palette"]] == PALETTE
    assert meta["eval"]["tile"] == 384 and meta["input"]["range"] == [0.0, 1.0] and meta["lowlabel_version"]
    assert main(["predict", str(f), str(test_images), "--out", str(tmp_path / "onnx")]) == 0
    assert main(["predict", str(sample_run), str(test_images), "--out", str(tmp_path / "run"), "--device", "cpu", "--precision", "fp32"]) == 0
    for i in TEST_IDS:  # the images exceed the tile (682 x 658 > 384): tiled and stitched
        a, b = Image.open(tmp_path / "onnx" / f"{i}.png"), Image.open(tmp_path / "run" / f"{i}.png")
        assert a.mode == b.mode == "P" and a.getpalette()[:15] == b.getpalette()[:15]
        assert np.array_equal(np.array(a), np.array(b))
        assert (tmp_path / "onnx" / "overlays" / f"{i}.jpg").is_file()
    # the Python API gives the same labels as the run's own predict
    run, exported = Run.load(sample_run, device="cpu", precision="fp32"), load_exported(f)
    img = sample_image(1)[:300, :333]
    assert np.array_equal(exported.predict(img).labels, run.predict(img).labels)


def test_torchscript_file_predicts_through_the_cli(sample_run, test_images, tmp_path):
    f = tmp_path / "sample.pt"
    assert main(["export", str(sample_run), "--format", "torchscript", "--out", str(f)]) == 0
    assert main(["predict", str(f), str(test_images / f"{TEST_IDS[0]}.jpg"), "--out", str(tmp_path / "ts"), "--no-overlay"]) == 0
    run = Run.load(sample_run, device="cpu", precision="fp32")
    assert np.array_equal(np.array(Image.open(tmp_path / "ts" / f"{TEST_IDS[0]}.png")), run.predict(sample_image(0)).labels)


def test_ssr_sam_exports_one_image_a_call(tmp_path):
    pytest.importorskip("segment_anything")
    torch.manual_seed(0)
    net = build_model("ssr-sam", "scratch", 3, options={"mspg": "tiny", "img_size": 64, "train_encoder": True})
    net.bank.add(torch.randn(3, net.mspg.dim), torch.tensor([0, 1, 1]))  # class 2 has no prompt: not decodable
    run = Run(net, ["a", "b", "c"], PALETTE[:3], precision="fp32")
    model = ExportedModel(export_run(run, "torchscript", tmp_path / "ssr.pt"))
    assert model.metadata["input"]["batch"] == 1 and model.metadata["input"]["max_size"] == 64
    x = torch.cat([sample_crop(48, 60), sample_crop(48, 60, i=1)])
    with torch.no_grad():
        ref = net(x)
    got = model(x)  # a batch of two, run one image a call
    assert (got - ref).abs().max() < 1e-3 and (got[:, 2] == -1e4).all()
    with pytest.raises(ValueError, match="exceeds"):
        model(sample_crop(80, 60))


def test_instance_models_are_refused_with_the_reason(tmp_path):
    torch.manual_seed(0)
    run = Run(build_model("maskrcnn", "resnet18", 1), ["nucleus"], [(255, 0, 0)], precision="fp32")
    with pytest.raises(ExportError, match="maskrcnn .*cannot be exported"):
        export_run(run, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@needs_ort
def test_bad_input_gives_one_line_errors(sample_run, tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    _one_line_error(capsys, ["export", str(not_a_run), "--format", "onnx", "--out", str(tmp_path / "a.onnx")], "lowlabel export: error:", "no checkpoints")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["export", str(junk), "--format", "onnx", "--out", str(tmp_path / "a.onnx")], "junk.pt", "checkpoint")
    _one_line_error(capsys, ["export", str(sample_run), "--format", "tflite", "--out", str(tmp_path / "a.tflite")], "'tflite'", "onnx or torchscript")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "a.tflite").exists()

    f = tmp_path / "m.onnx"
    assert main(["export", str(sample_run), "--format", "onnx", "--out", str(f)]) == 0
    capsys.readouterr()
    bare = tmp_path / "bare.onnx"
    shutil.copy(f, bare)  # an .onnx without its metadata
    _one_line_error(capsys, ["predict", str(bare), str(SAMPLE / "images"), "--out", str(tmp_path / "p")], "bare.onnx", "no metadata")
    other = tmp_path / "other.onnx"  # metadata that belongs to another file
    other.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    shutil.copy(metadata_path(f), metadata_path(other))
    _one_line_error(capsys, ["predict", str(other), str(SAMPLE / "images"), "--out", str(tmp_path / "p")], "other.onnx", "SHA-256")
    metadata_path(bare).write_text("{not json")
    _one_line_error(capsys, ["predict", str(bare), str(SAMPLE / "images"), "--out", str(tmp_path / "p")], "bare.onnx.json", "unreadable metadata")
    _one_line_error(capsys, ["predict", str(f), str(SAMPLE / "images"), "--out", str(tmp_path / "p"), "--precision", "bf16"], "fp32")
    assert not (tmp_path / "p").exists()


def test_api_errors_name_the_problem(tmp_path):
    run = random_run("tiny", width=4)
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export_run(run, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ExportError, match="is a folder"):
        export_run(run, "torchscript", tmp_path)
    with pytest.raises(CheckpointError):
        export_run(tmp_path / "missing.pt", "torchscript", tmp_path / "m.pt")
    with pytest.raises(ExportError, match="not found"):
        read_metadata(tmp_path / "missing.onnx")
    model = ExportedModel(export_run(run, "torchscript", tmp_path / "m.pt"))
    with pytest.raises(ValueError, match=r"takes float images \[B, 3, H, W\]"):
        model(torch.rand(1, 4, 32, 32))
