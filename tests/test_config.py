
import pytest
import torch
import yaml

from lowlabel.config import task_of, load_config
from lowlabel.methods import build_method
from lowlabel.models import build_model

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs_for_the_shared_datasets():
    names = {p.stem for p in CONFIGS}
    for ds in ("camvid", "dubai-aerial", "isbi2012-em"):
        assert f"{ds}-unimatch-cpu" in names and f"{ds}-unimatch-gpu" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses_and_builds(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    num_classes = 5
    model = build_model(cfg.model.arch, cfg.model.encoder, num_classes, width=cfg.model.width)
    method = build_method(cfg.method.name, cfg.method.params, num_classes=num_classes, model=model, task=task_of(cfg))
    assert isinstance(method, torch.nn.Module)


def test_overrides_and_one_base_level(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"data": {"root": "x", "crop": 64}, "optim": {"lr": 0.1}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml", "name": "b", "optim": {"momentum": 0.5}}))
    cfg = load_config(tmp_path / "b.yaml", ["optim.lr=0.02", "data.labeled=1/8", "method.name=fixmatch"])
    assert cfg.optim.lr == 0.02 and cfg.optim.momentum == 0.5 and cfg.data.crop == 64
    assert cfg.data.labeled == "1/8" and cfg.method.params["threshold"] == 0.95
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "b.yaml"}))
    with pytest.raises(ValueError, match="one level"):
        load_config(tmp_path / "c.yaml")


def test_bad_values_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        load_config(raw={"data": {"root": "x", "crop": 100}})
    with pytest.raises(ValueError, match="Extra inputs"):
        load_config(raw={"data": {"root": "x"}, "optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="key.path=value"):
        load_config(raw={"data": {"root": "x"}}, overrides=["nonsense"])
    with pytest.raises(ValueError, match="SAM, which takes RGB"):
        load_config(raw={"data": {"root": "x", "bands": [1, 2, 3, 4]}, "model": {"in_channels": 4}, "method": {"name": "sesam"}})
    with pytest.raises(ValueError, match="band numbers counted from 1"):
        load_config(raw={"data": {"root": "x", "bands": [0, 1, 2]}})
    assert load_config(raw={"data": {"root": "x", "bands": [4, 3, 2, 1, 5]}, "model": {"in_channels": 5}}).model.in_channels == 5
