import json

import yaml

from lowlabel.bench import cells, load_protocol, run_protocol
from lowlabel.cli import main

from .conftest import REPO


def test_two_cell_protocol_runs_resumes_and_reports(tiny_dataset, tmp_path):
    proto = {
        "name": "tiny", "split": "test", "fractions": ["2"], "seeds": [0],
        "config": {
            "data": {"root": str(tiny_dataset), "crop": 32, "labeled_batch": 2, "unlabeled_batch": 2},
            "model": {"arch": "tiny", "width": 4}, "optim": {"lr": 0.01},
            "train": {"iterations": 3, "val_every": 3, "checkpoint_every": 3}, "eval": {"tile": 64},
        },
        "methods": {"supervised": {"method": {"name": "supervised"}}, "fixmatch": {"method": {"name": "fixmatch"}}},
    }
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(proto))
    out = tmp_path / "res"
    res = run_protocol(p, out=out, progress=False)
    assert res["cells"] == 2 and {r["method"] for r in res["rows"]} == {"supervised", "fixmatch"}
    cell = json.loads((out / "cells" / "fixmatch__2__s0.json").read_text())
    for k in ("test_miou", "test_per_class_iou", "train_seconds", "seconds_per_iteration", "images_per_second", "peak_rss_mb", "commit", "val_history"):
        assert k in cell
    assert cell["peak_rss_mb"] > 10
    for f in ("results.json", "results.md", "miou.png", "val_curves.png"):
        assert (out / f).exists()
    assert "| supervised | 2 | 0 |" in (out / "results.md").read_text()
    before = (out / "cells" / "fixmatch__2__s0.json").stat().st_mtime
    assert main(["bench", str(p), "--out", str(out)]) == 0  # finished cells are skipped
    assert (out / "cells" / "fixmatch__2__s0.json").stat().st_mtime == before


def test_committed_protocols_expand():
    for path in sorted((REPO / "benchmarks" / "protocols").glob("*.yaml")):
        proto = load_protocol(path)
        cs = cells(proto)
        expected = sum(len(m.get("seeds", proto["seeds"])) for m in proto["methods"].values())
        assert len(cs) == expected
        seeds = [c["seed"] for c in cs]
        assert seeds == sorted(seeds)  # seed-major
        full = [c for c in cs if c["method"] == "full"]
        assert all(c["raw"]["data"]["labeled"] == "1" for c in full)
