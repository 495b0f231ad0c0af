import json

import yaml

from lowlabel.bench import _late_pseudo_means, aggregate, cells, label_kind, labeled_only_rows, load_protocol, run_protocol, step_seconds
from lowlabel.cli import main
from lowlabel.config import load_config

from .conftest import REPO


def test_two_cell_protocol_runs_resumes_and_reports(tiny_dataset, tmp_path):
    proto = {
        "name": "tiny", "split": "test", "fractions": ["2"], "seeds": [0],
        "config": {
            "data": {"root": str(tiny_dataset), "crop": 32, "labeled_batch": 2, "unlabeled_batch": 2},
            "model": {"arch": "tiny", "width": 4}, "optim": {"lr": 0.01},
            "train": {"iterations": 3, "val_every": 3, "checkpoint_every": 3}, "eval": {"tile": 64},
        },
        "methods": {"supervised": {"method": {"name": "supervised"}}, "fixmatch": {"method": {"name": "fixmatch"}, "data": {"unlabeled_gt": True}}},
    }
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(proto))
    out = tmp_path / "res"
    res = run_protocol(p, out=out, progress=False)
    assert res["cells"] == 2 and {r["method"] for r in res["rows"]} == {"supervised", "fixmatch"}
    cell = json.loads((out / "cells" / "fixmatch__2__s0.json").read_text())
    for k in ("test_miou", "test_per_class_iou", "dice_mean", "test_per_class_dice", "train_seconds", "seconds_per_iteration", "images_per_second", "peak_rss_mb", "commit", "val_history", "step_seconds"):
        assert k in cell
    assert cell["peak_rss_mb"] > 10
    assert cell["labeled_images"] == 2 and cell["label_kind"] == "fine"
    assert {"acc_all", "mask_ratio"} <= set(cell["pseudo_accuracy_history"])  # acc_threshold only once a pixel is confident
    for f in ("results.json", "results.md", "miou.png", "val_curves.png", "pseudo_labels.png"):
        assert (out / f).exists()
    md = (out / "results.md").read_text()
    assert "test Dice (%)" in md and "pooled over the split" in md
    assert len(cell["val_history"][0]) == 3  # iteration, mIoU, mean foreground Dice
    assert "| supervised | 2 | 0 |" in md and "| fixmatch | 2 | " in md.split("## Pseudo-labels")[1]
    cal = cell["unlabeled_calibration"]  # the evaluated model's confidences on the unlabeled images, against their masks
    unl = (out / "runs" / "fixmatch__2__s0" / "splits" / "unlabeled.txt").read_text().split()
    assert cal["images"] == len(unl) and 0 <= cal["ece"] <= 100 and set(cal["per_class"]) == {"a", "b", "c"}
    conf = md.split("## Confidence on the unlabeled images")[1]
    assert "| fixmatch | 2 | " in conf and "a recall" in conf
    assert res["rows"][[r["method"] for r in res["rows"]].index("fixmatch")]["calibration"]["ece"] == cal["ece"]
    sup = json.loads((out / "cells" / "supervised__2__s0.json").read_text())["unlabeled_calibration"]
    assert sup["images"] == 2 and "| supervised | 2 | " in conf  # labeled-only: the train images it did not train on
    before = (out / "cells" / "fixmatch__2__s0.json").stat().st_mtime
    assert main(["bench", str(p), "--out", str(out)]) == 0  # finished cells are skipped
    assert (out / "cells" / "fixmatch__2__s0.json").stat().st_mtime == before
    # --in-process trains the same cell in this process, to the same record
    out2 = tmp_path / "res-in-process"
    assert main(["bench", str(p), "--out", str(out2), "--only", "fixmatch", "--in-process"]) == 0
    cell2 = json.loads((out2 / "cells" / "fixmatch__2__s0.json").read_text())
    assert cell2["test_miou"] == cell["test_miou"] and cell2["val_history"] == cell["val_history"]


def test_committed_protocols_expand():
    for path in sorted((REPO / "benchmarks" / "protocols").glob("*.yaml")):
        proto = load_protocol(path)
        cs = cells(proto)
        expected = sum(len(m.get("seeds", proto["seeds"])) * len(m.get("fractions", proto["fractions"])) for m in proto["methods"].values())
        assert len(cs) == expected
        seeds = [c["seed"] for c in cs]
        assert seeds == sorted(seeds)  # seed-major
        full = [c for c in cs if c["method"] == "full"]
        assert all(c["raw"]["data"]["labeled"] == "1" for c in full)
        for c in cs:  # every cell's config validates (method parameters included)
            load_config(raw=c["raw"])
        assert len({c["cell"] for c in cs}) == len(cs)


def test_pseudo_label_means_use_the_second_half_then_average_seeds():
    rows = [
        {"iterations": 100, "pseudo_accuracy_history": {"acc_x": [[10, 0.0], [50, 0.0], [60, 0.5], [100, 0.7]], "mask_ratio": [[100, 0.2]]}},
        {"iterations": 100, "pseudo_accuracy_history": {"acc_x": [[80, 0.9]]}},
        {"iterations": 100},  # a method without pseudo-labels
    ]
    m = _late_pseudo_means(rows)
    assert abs(m["acc_x"] - (0.6 + 0.9) / 2) < 1e-9 and abs(m["mask_ratio"] - 0.2) < 1e-9


def test_step_seconds_leaves_out_validation_and_resumes():
    recs = [{"iteration": 10, "time": 10.0}, {"iteration": 20, "time": 20.0}, {"iteration": 20, "val": {}},
            {"iteration": 30, "time": 90.0}, {"iteration": 40, "time": 100.0},  # 30: includes a validation
            {"iteration": 50, "time": 8.0}, {"iteration": 60, "time": 18.0}]    # resumed: clock restarts
    assert step_seconds(recs) == 1.0
    assert step_seconds([{"iteration": 10, "time": 1.0}]) is None


def test_weak_vs_fine_and_annotation_cost(tmp_path):
    """WvF is each row's score over the reference row's; annotation hours are labeled images x
    SeSAM's per-image cost of the row's label kind (scribble 2.2 min, fine 90 min)."""
    assert (label_kind(None), label_kind("scribbles"), label_kind("points"), label_kind("coarse"), label_kind("refined")) == ("fine", "scribble", "point", "coarse", None)
    (tmp_path / "cells").mkdir()

    def cell(method, seed, dice, n, kind):
        rec = {"cell": f"{method}__1__s{seed}", "method": method, "fraction": "1", "seed": seed, "test_miou": dice, "test_per_class_iou": {"a": dice},
               "dice_mean": dice, "dice_by": "volume", "test_per_class_dice": {"a": dice}, "seconds_per_iteration": 1.0, "step_seconds": 1.0,
               "images_per_second": 8.0, "train_seconds": 60.0, "peak_rss_mb": 100.0, "val_history": [[10, dice, dice]], "iterations": 10,
               "commit": "c", "machine": "m", "labeled_images": n, "label_kind": kind}
        (tmp_path / "cells" / f"{rec['cell']}.json").write_text(json.dumps(rec))

    for seed, (a, b) in enumerate([(0.4, 0.8), (0.6, 0.8)]):
        cell("pce", seed, a, 100, "scribble")
        cell("full", seed, b, 100, "fine")
    res = aggregate(tmp_path, {"name": "t", "methods": {"pce": {}, "full": {}}})
    rows = {r["method"]: r for r in res["rows"]}
    assert abs(rows["pce"]["wvf"] - 0.625) < 1e-9 and rows["full"]["wvf"] == 1.0
    assert abs(rows["pce"]["annotation_hours"] - 100 * 2.2 / 60) < 1e-9 and rows["full"]["annotation_hours"] == 150
    md = (tmp_path / "results.md").read_text()
    assert "| 62.5 | 100 x scribble | 3.7 |" in md and (tmp_path / "cost_vs_score.png").exists()
    res = aggregate(tmp_path, {"name": "t", "methods": {"pce": {}, "full": {}}, "reference": "none-such"})
    assert "wvf" not in res["rows"][0]


def test_a_row_says_what_it_is_and_its_config_does_not_see_it(tmp_path):
    """A protocol's ``what:`` (e.g. a from-scratch stand-in for a pretrained model) stands beside
    the row's name in results.md and the summary, and is not part of the cell's config."""
    proto = {"name": "t", "seeds": [0], "fractions": ["1"], "config": {"data": {"root": str(tmp_path)}, "model": {"arch": "tiny"}},
             "methods": {"ssr_sam": {"method": {"name": "supervised"}, "what": "SSR-SAM recipe, scratch encoder"}, "plain": {"method": {"name": "supervised"}}}}
    cs = cells(proto)
    assert all("what" not in c["raw"] for c in cs)
    load_config(raw=cs[0]["raw"])
    (tmp_path / "cells").mkdir()
    for m in ("ssr_sam", "plain"):
        rec = {"cell": f"{m}__1__s0", "method": m, "fraction": "1", "seed": 0, "test_miou": 0.5, "test_per_class_iou": {"a": 0.5},
               "seconds_per_iteration": 1.0, "step_seconds": 1.0, "images_per_second": 8.0, "train_seconds": 60.0, "peak_rss_mb": 100.0,
               "val_history": [[10, 0.5]], "iterations": 10, "commit": "c", "machine": "m"}
        (tmp_path / "cells" / f"{m}__1__s0.json").write_text(json.dumps(rec))
    res = aggregate(tmp_path, proto)
    assert [r.get("what") for r in res["rows"]] == ["SSR-SAM recipe, scratch encoder", None]
    md = (tmp_path / "results.md").read_text()
    assert "| ssr_sam (SSR-SAM recipe, scratch encoder) | 1 | 0 |" in md and "| plain | 1 | 0 |" in md


def test_each_row_is_set_against_labeled_only_and_a_loss_is_said_plainly(tmp_path, capsys):
    """``vs labeled-only``: a row's mean minus the labeled-only row's on the same labeled set; a
    row at or below it is named in one plain sentence (results.md and the bench summary)."""
    proto = {"name": "t", "seeds": [0, 1], "fractions": ["1/8", "1/4"], "config": {"data": {"root": str(tmp_path)}, "model": {"arch": "tiny"}},
             "methods": {"supervised": {"method": {"name": "supervised"}}, "unimatch": {"method": {"name": "unimatch"}},
                         "fixmatch": {"method": {"name": "fixmatch"}}}}
    assert labeled_only_rows(proto) == {"supervised"} and labeled_only_rows({**proto, "labeled_only": "fixmatch"}) == {"fixmatch"}
    (tmp_path / "cells").mkdir()
    scores = {("supervised", "1/8"): 0.40, ("unimatch", "1/8"): 0.55, ("fixmatch", "1/8"): 0.38, ("supervised", "1/4"): 0.5, ("unimatch", "1/4"): 0.6}
    for (m, f), v in scores.items():
        for seed in (0, 1):
            rec = {"cell": f"{m}__{f.replace('/', '-')}__s{seed}", "method": m, "fraction": f, "seed": seed, "test_miou": v + 0.01 * seed,
                   "test_per_class_iou": {"a": v}, "seconds_per_iteration": 1.0, "step_seconds": 1.0, "images_per_second": 8.0,
                   "train_seconds": 60.0, "peak_rss_mb": 100.0, "val_history": [[10, v]], "iterations": 10, "commit": "c", "machine": "m"}
            (tmp_path / "cells" / f"{rec['cell']}.json").write_text(json.dumps(rec))
    res = aggregate(tmp_path, proto)
    rows = {(r["method"], r["fraction"]): r for r in res["rows"]}
    assert "vs_labeled_only" not in rows[("supervised", "1/8")]
    assert abs(rows[("unimatch", "1/8")]["vs_labeled_only"] - 0.15) < 1e-9 and rows[("unimatch", "1/8")]["helped"]
    assert abs(rows[("unimatch", "1/4")]["vs_labeled_only"] - 0.10) < 1e-9  # against the 1/4 labeled-only row, not the 1/8 one
    assert rows[("fixmatch", "1/8")]["helped"] is False and rows[("fixmatch", "1/8")]["labeled_only_row"] == "supervised"
    md = (tmp_path / "results.md").read_text()
    assert "| +15.0 |" in md and "| -2.0 |" in md
    assert "Semi-supervision did not help here for fixmatch 1/8 (-2.0)" in md and "unimatch 1/" not in md.split("did not help")[1].split("\n")[0]
    del proto["methods"]["fixmatch"]  # its 1/4 cells are not there: without it every cell is done and bench trains nothing
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(proto))
    assert main(["bench", str(p), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vs labeled-only" in out and "Semi-supervision did not help here for fixmatch 1/8" in out
