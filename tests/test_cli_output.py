"""Machine-readable output (``--json``) of the listing commands, and tables that never cut
identifiers: off a terminal (a pipe) every column is as wide as its content; on a narrow terminal
identifier columns fold onto further lines rather than end in an ellipsis."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image
from rich.console import Console

from lowlabel.cli import bench_table, main, weights_table
from lowlabel.sam.weights import CHECKPOINTS


def _column_text(rendered: str, header: str) -> str:
    """The concatenated content of one column of a rendered rich table, body lines in order."""
    lines = rendered.splitlines()
    head = next(i for i, ln in enumerate(lines) if "┃" in ln and header in ln)
    col = [c.strip() for c in lines[head].split("┃")].index(header)
    return "".join(ln.split("│")[col].strip() for ln in lines[head + 1:] if ln.startswith("│"))


def test_weights_list_piped_shows_every_hash_whole_on_one_line():
    r = subprocess.run([sys.executable, "-m", "lowlabel.cli", "weights", "list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    for c in CHECKPOINTS.values():
        assert len(c.sha256) == 64
        line = next(ln for ln in r.stdout.splitlines() if f" {c.name} " in ln)
        assert c.sha256 in line and c.url in line


def test_weights_table_folds_identifiers_on_a_narrow_terminal():
    con = Console(width=80, force_terminal=True, color_system=None, record=True)
    con.print(weights_table(CHECKPOINTS.values()))
    text = con.export_text()
    assert max(len(ln) for ln in text.splitlines()) <= 80 and "…" not in text
    assert _column_text(text, "sha256") == "".join(c.sha256 for c in CHECKPOINTS.values())
    assert _column_text(text, "url") == "".join(c.url for c in CHECKPOINTS.values())


def test_weights_list_json(capsys):
    assert main(["weights", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [dataclasses.asdict(c) for c in CHECKPOINTS.values()]
    assert all(len(c["sha256"]) == 64 for c in listed)


def test_evaluate_json(tiny_dataset, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = np.array(Image.open(tiny_dataset / "masks" / "img05.png"))
    Image.fromarray(np.where(gt == 255, 0, gt).astype(np.uint8)).save(pred / "img05.png")
    out = tmp_path / "m.json"
    assert main(["evaluate", str(pred), "--data", str(tiny_dataset), "--split", "test", "--json", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    m = json.loads(captured.out)  # stdout is the JSON document and nothing else
    assert m["miou"] == 1.0 and m["images"] == 1 and set(m["per_class_iou"]) == {"a", "b", "c"}
    assert json.loads(out.read_text()) == m
    assert main(["evaluate", str(pred), "--data", str(tiny_dataset), "--split", "test"]) == 0
    assert "mIoU" in capsys.readouterr().out  # without --json: the table


def _cell(folder, method, seed, miou):
    rec = {"cell": f"{method}__1-8__s{seed}", "method": method, "fraction": "1/8", "seed": seed, "test_miou": miou,
           "test_per_class_iou": {"a": miou, "b": None}, "seconds_per_iteration": 1.0, "step_seconds": 1.0, "images_per_second": 8.0,
           "train_seconds": 60.0, "peak_rss_mb": 100.0, "val_history": [[10, miou]], "iterations": 10, "commit": "c0ffee", "machine": "m"}
    (folder / "cells" / f"{rec['cell']}.json").write_text(json.dumps(rec))


def test_bench_summary_json_and_table(tmp_path, capsys):
    """A protocol whose cells are all done: ``bench`` trains nothing and reports the summary,
    as JSON (NaN as null) with --json and as a table without."""
    proto = {"name": "t", "split": "test", "fractions": ["1/8"], "seeds": [0, 1],
             "config": {"data": {"root": str(tmp_path)}, "model": {"arch": "tiny"}},
             "methods": {"supervised": {"method": {"name": "supervised"}},
                         "a_method_with_a_very_long_name_that_a_table_must_not_cut": {"method": {"name": "unimatch"}}}}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(proto))
    out = tmp_path / "res"
    (out / "cells").mkdir(parents=True)
    long = "a_method_with_a_very_long_name_that_a_table_must_not_cut"
    for seed, (a, b) in enumerate([(0.2, 0.3), (0.4, 0.5)]):
        _cell(out, "supervised", seed, a)
        _cell(out, long, seed, b)
    assert main(["bench", str(p), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert "skipped" in captured.err  # progress went to stderr
    assert res["results_dir"] == str(out) and res["protocol"] == "t" and res["cells"] == 4
    rows = {r["method"]: r for r in res["rows"]}
    assert abs(rows[long]["test_miou_mean"] - 0.4) < 1e-9 and rows[long]["test_miou_per_seed"] == [0.3, 0.5]
    assert rows["supervised"]["per_class_iou_mean"]["b"] is None  # an undefined mean is null, not NaN
    assert json.loads((out / "results.json").read_text())["cells"] == 4
    assert main(["bench", str(p), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert long in text and "40.0 ± 14.1" in text and "30.0, 50.0" in text
    con = Console(width=60, force_terminal=True, color_system=None, record=True)
    con.print(bench_table(res))
    narrow = con.export_text()
    assert "…" not in narrow and _column_text(narrow, "method") == "".join(r["method"] for r in res["rows"])
