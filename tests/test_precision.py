"""Precision: resolution per device, bf16 training steps, bf16 prediction against fp32, resume,
and the fp32 islands (logits, caches keyed by precision)."""

import json

import numpy as np
import pytest
import torch

import lowlabel.precision as precision_mod
from lowlabel.api import fit
from lowlabel.config import load_config
from lowlabel.engine.run import Run
from lowlabel.engine.trainer import Trainer
from lowlabel.errors import ConfigError
from lowlabel.models import build_model
from lowlabel.precision import Precision, autocast_tag, legacy_precision, resolve_precision

from .conftest import make_dataset, tiny_config


@pytest.fixture
def no_bf16_units(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_bf16_units", lambda: ())


@pytest.fixture
def amx(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_bf16_units", lambda: ("amx_bf16",))


def test_auto_on_a_cpu_without_bf16_units_is_fp32(no_bf16_units):
    p = resolve_precision("auto", "cpu")
    assert (p.name, p.mixed, p.requested) == ("fp32", False, "auto")
    assert "no amx_bf16 / avx512_bf16" in p.reason


def test_auto_on_a_cpu_with_amx_is_bf16(amx):
    p = resolve_precision("auto", "cpu")
    assert (p.name, p.dtype) == ("bf16", torch.bfloat16) and "amx_bf16" in p.reason


def test_explicit_choices_and_errors(no_bf16_units):
    assert resolve_precision("fp32", "cpu").name == "fp32"
    emulated = resolve_precision("bf16", "cpu")
    assert emulated.name == "bf16" and "emulated" in emulated.reason
    with pytest.raises(ConfigError, match="fp16 runs on CUDA only"):
        resolve_precision("fp16", "cpu", setting="train.precision")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_precision("int8", "cpu")


def test_channels_last_follows_the_model_class_unless_forced():
    conv = build_model("tiny", num_classes=2, width=4)
    assert resolve_precision("fp32", "cpu", model=conv).channels_last
    assert not resolve_precision("fp32", "cpu", model=torch.nn.Linear(2, 2)).channels_last  # no claim: off
    assert not resolve_precision("fp32", "cpu", model=conv, channels_last=False).channels_last
    p = resolve_precision("fp32", "cpu", model=conv)
    p.prepare(conv)
    w = conv.encoder.stages[0][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert p.images(torch.zeros(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)


def test_record_round_trips_and_legacy_checkpoints():
    p = resolve_precision("bf16", "cpu", channels_last=True)
    assert Precision.from_record(json.loads(json.dumps(p.record()))) == p
    assert legacy_precision("cpu", "auto") == "fp32" and legacy_precision("cuda", "auto") == "fp16" and legacy_precision("cuda", False) == "fp32"


def test_train_amp_is_migrated_with_a_clear_error(tiny_dataset, tmp_path):
    raw = tiny_config(tiny_dataset, tmp_path)
    raw["train"]["amp"] = True
    with pytest.raises(ConfigError, match="train.amp was replaced by train.precision"):
        load_config(raw=raw)
    raw["train"]["amp"] = "auto"  # what every run directory's config.yaml before train.precision holds
    assert load_config(raw=raw).train.precision == "auto"


def test_logits_are_float32_under_bf16_autocast():
    net = build_model("tiny", num_classes=3, width=4)
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = net.encode(x)
        logits = net.decode(feats, x.shape[-2:])
    assert feats[-1].dtype == torch.bfloat16  # the convolutions ran in bf16
    assert logits.dtype == torch.float32  # what losses and thresholds read
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in net.buffers())


def test_autocast_tag_names_the_precision_in_force():
    assert autocast_tag("cpu") == b"fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_tag("cpu") == b"bf16"


def test_bf16_training_step_is_finite_updates_weights_and_is_recorded(tmp_path):
    data = make_dataset(tmp_path / "d", n=8)
    raw = tiny_config(data, tmp_path / "r", "unimatch", "self", iterations=2, train={"precision": "bf16"})
    tr = Trainer(load_config(raw=raw), progress=False)
    before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    summary = tr.fit()
    after = tr.student.state_dict()
    assert summary["precision"] == "bf16" and summary["channels_last"] is True
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("weight" in k for k in changed) and any("running_mean" in k for k in changed)
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights and BN statistics stay fp32
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    logged = [json.loads(line) for line in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in logged if "loss" in r)
    meta = json.loads((tr.run_dir / "run.json").read_text())
    assert meta["precision"]["name"] == "bf16" and meta["precision"]["requested"] == "bf16"


def test_resume_keeps_the_precision_of_the_checkpoint(tmp_path, no_bf16_units):
    """auto resolves to fp32 on this (patched) CPU, but a run that trained in bf16 resumes in
    bf16; a checkpoint from before train.precision resumes in fp32 on a CPU."""
    data = make_dataset(tmp_path / "d", n=8)
    raw = tiny_config(data, tmp_path / "r", "supervised", "none", iterations=4, train={"precision": "bf16"})
    Trainer(load_config(raw=raw), progress=False).fit(stop_at=2)
    run_dir = tmp_path / "r" / raw["name"]
    cfg = load_config(raw={**raw, "train": {**raw["train"], "precision": "auto"}})
    tr = Trainer(cfg, run_dir=run_dir, resume=True, progress=False)
    assert tr.precision.name == "bf16" and "resumed" in tr.precision.reason
    assert json.loads((run_dir / "run.json").read_text())["precision"]["name"] == "bf16"

    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    del state["precision"]  # as written before train.precision existed
    torch.save(state, run_dir / "checkpoints" / "last.pt")
    assert Trainer(cfg, run_dir=run_dir, resume=True, progress=False).precision.name == "fp32"


def test_bf16_prediction_agrees_with_fp32(tmp_path):
    data = make_dataset(tmp_path / "d", n=8, size=(64, 96))
    raw = tiny_config(data, tmp_path / "r", "supervised", "none", iterations=30, train={"precision": "fp32", "val_every": 0})
    run = fit(load_config(raw=raw), progress=False)
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(data / "images" / "img07.png").convert("RGB"))
    fp32_run, bf16_run = Run.load(run.run_dir, device="cpu"), Run.load(run.run_dir, device="cpu", precision="bf16")
    assert (fp32_run.precision.name, bf16_run.precision.name) == ("fp32", "bf16")
    a, b = fp32_run.predict(image, return_probs=True), bf16_run.predict(image, return_probs=True)
    assert b.probs.dtype == torch.float32
    assert (a.labels == b.labels).mean() >= 0.99
    assert float((a.probs - b.probs).abs().max()) < 0.1
    # the run's own evaluation precision follows its train.precision
    assert Run.load(run.run_dir, device="cpu").precision.requested == "fp32"


def test_sam_embedding_cache_keys_carry_the_precision(tmp_path):
    from lowlabel.sam.cache import EmbeddingCache
    from lowlabel.sam.classical import ClassicalSegmenter

    img = np.zeros((8, 8, 3), np.uint8)
    a, b = ClassicalSegmenter(), ClassicalSegmenter()
    b.precision = "bf16"
    cache = EmbeddingCache(tmp_path)
    assert cache.key(img, a) != cache.key(img, b)
