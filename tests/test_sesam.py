"""SeSAM: SAM labels kept in the original frame and mapped onto views, the paper's precedence
(weak > SAM > pseudo), refresh every M iterations, exact resume with the SAM labels, and the
settings it refuses."""


import pytest
import torch

from lowlabel.api import fit
from lowlabel.config import load_config
from lowlabel.engine.trainer import Trainer
from lowlabel.errors import ConfigError
from lowlabel.methods import build_method

from .conftest import make_dataset, tiny_config
from .test_weak_refine import _with_scribbles


@pytest.fixture
def scribbled(tmp_path):
    return _with_scribbles(make_dataset(tmp_path / "src", n=12), tmp_path / "d")


def _raw(data, out, iterations=6, **params):
    raw = tiny_config(data, out, "sesam", "ema", iterations=iterations, data={"weak": "scribbles", "labeled": "1"})
    raw["method"]["params"] = params
    return raw


def test_gather_maps_original_frame_labels_onto_views():
    m = build_method("sesam", {}, num_classes=3)
    m.bank = {"a": torch.arange(12, dtype=torch.uint8).view(3, 4)}
    sy = torch.tensor([[[0, 2], [-1, 1]], [[0, 0], [0, 0]]])
    sx = torch.tensor([[[3, 0], [-1, 2]], [[0, 0], [0, 0]]])
    out = m.gather(["a", "b"], sy, sx)  # "b" has no SAM labels yet
    assert out.tolist() == [[[3, 8], [255, 6]], [[255, 255], [255, 255]]]


def test_losses_follow_the_papers_precedence(scribbled, tmp_path):
    """Each loss reads only its own pixels: L_SAM never where a weak label is, L_pseudo only
    where neither a weak nor a SAM label is."""
    raw = _raw(scribbled, tmp_path / "runs", theta1=0.0)
    raw["data"]["unlabeled_gt"] = True  # the dense masks, for the SAM-label accuracy diagnostic only
    tr = Trainer(load_config(raw=raw), progress=False)
    batch = tr._to_device(next(tr.lab_stream.batches(0)))
    out = tr.method.training_step(tr.student, tr.teacher, batch, None, tr._ctx())  # iteration 0: refresh
    assert out.metrics["bank_images"] == 2
    weak, valid = batch["mask"], batch["valid"]
    sam = tr.method.gather(batch["id"], batch["src_y"], batch["src_x"])
    n = valid.sum().item()
    sam_only = (sam != 255) & (weak == 255) & valid
    assert out.metrics["sam_ratio"] == pytest.approx(sam_only.sum().item() / n)
    assert out.metrics["pseudo_ratio"] == pytest.approx(((weak == 255) & (sam == 255) & valid).sum().item() / n)  # theta1 = 0 keeps all
    assert sam_only.any() and out.metrics["pseudo_ratio"] > 0
    gt = batch["gt"]
    assert (weak[weak != 255] == gt[weak != 255]).all()  # the weak labels are the truth's pixels
    assert out.metrics["acc_sam"] == pytest.approx((sam[sam_only] == gt[sam_only]).float().mean().item())
    # the weak labels override SAM's in the bank itself (original frame)
    sid = batch["id"][0]
    raw = tr.labeled_set.load(tr.labeled_set.ids.index(sid))["mask"]
    bank = tr.method.bank[sid].numpy()
    assert (bank[raw != 255] == raw[raw != 255]).all()


def test_refresh_every_m_sightings_of_an_image(scribbled, tmp_path, monkeypatch):
    """Each image gets SAM labels the first time it is seen, then every M-th time (per image, not
    per global iteration: with an epoch sampler a global rule leaves most first-epoch views without
    SAM labels)."""
    from lowlabel.methods.sesam import SeSAM

    calls, seen = [], []
    real, step = SeSAM.refresh, SeSAM.training_step
    monkeypatch.setattr(SeSAM, "refresh", lambda self, sid, teacher, it: calls.append((sid, it)) or real(self, sid, teacher, it))
    monkeypatch.setattr(SeSAM, "training_step", lambda self, s, t, lab, unl, ctx: seen.extend((sid, ctx.iteration) for sid in lab["id"]) or step(self, s, t, lab, unl, ctx))
    fit(load_config(raw=_raw(scribbled, tmp_path / "runs", iterations=15, resample_every=2)), progress=False)
    expected = []
    for sid in sorted({s for s, _ in seen}):
        its = [it for s, it in seen if s == sid]
        assert len(its) == 3  # 10 images, 2 a batch, 15 iterations: 3 epochs
        expected += [(sid, its[0]), (sid, its[2])]  # sightings 0 and 2 with M = 2
    assert sorted(calls) == sorted(expected)


def test_resume_mid_epoch_keeps_the_sam_labels(scribbled, tmp_path):
    raw = _raw(scribbled, tmp_path / "a", iterations=7)
    fit(load_config(raw=raw), progress=False)
    full = torch.load(tmp_path / "a" / raw["name"] / "checkpoints" / "last.pt", weights_only=True)
    raw_b = _raw(scribbled, tmp_path / "b", iterations=7)
    tr = Trainer(load_config(raw=raw_b), progress=False)
    assert tr.iters_per_epoch == 5
    tr.fit(stop_at=2)  # after the refresh at 0, before the one at 4
    run_dir = tmp_path / "b" / raw_b["name"]
    assert any(k.startswith("bank.") for k in torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["method"])
    fit(resume=run_dir, progress=False)
    resumed = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for k, v in full["student"].items():
        assert torch.equal(v, resumed["student"][k]), k
    assert full["method"].keys() == resumed["method"].keys()
    for k, v in full["method"].items():
        assert torch.equal(v, resumed["method"][k]), k


def test_refuses_settings_it_cannot_run(scribbled, tmp_path):
    raw = _raw(scribbled, tmp_path / "r1")
    raw["teacher"]["kind"] = "self"
    with pytest.raises(ConfigError, match="teacher.kind=ema"):
        Trainer(load_config(raw=raw), progress=False)
    with pytest.raises(ConfigError, match="allow_random_weights"):
        Trainer(load_config(raw=_raw(scribbled, tmp_path / "r2", backend="mobilesam")), progress=False)
    no_weak = tiny_config(scribbled, tmp_path / "r3", "sesam", "ema")
    with pytest.raises(ConfigError, match="data.weak"):
        Trainer(load_config(raw=no_weak), progress=False)
    assert not any((tmp_path / f"r{i}").exists() for i in (1, 2, 3))
