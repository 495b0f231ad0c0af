import pytest

from lowlabel.cli import main
from lowlabel.data.splits import make_split, parse_fraction, split_ids


def test_fraction_parsing():
    assert parse_fraction("1/8") == 0.125
    assert parse_fraction(0.5) == 0.5
    with pytest.raises(ValueError):
        parse_fraction("0")
    with pytest.raises(ValueError):
        parse_fraction("abc")


def test_split_is_seeded_and_partitions():
    ids = [f"i{k}" for k in range(40)]
    a = split_ids(ids, fraction="1/8", seed=0)
    assert split_ids(list(reversed(ids)), fraction=0.125, seed=0) == a  # order of the file does not matter
    assert len(a[0]) == 5 and len(a[1]) == 35
    assert set(a[0]) | set(a[1]) == set(ids) and not set(a[0]) & set(a[1])
    assert split_ids(ids, fraction="1/8", seed=1)[0] != a[0]
    assert len(split_ids(ids, count=7, seed=0)[0]) == 7
    with pytest.raises(ValueError):
        split_ids(ids, count=41)


def test_split_cli(tiny_dataset, tmp_path):
    out = tmp_path / "sp"
    assert main(["split", str(tiny_dataset), "--count", "2", "--seed", "3", "--out", str(out)]) == 0
    lab = (out / "labeled.txt").read_text().split()
    unl = (out / "unlabeled.txt").read_text().split()
    assert len(lab) == 2 and len(unl) == 2
    assert (lab, unl) == make_split(tiny_dataset, count=2, seed=3)
