import numpy as np
import pytest
from skimage.morphology import skeletonize

from lowlabel.sam.prompts import SAMPLERS, coverage_compatibility, distance_field, instances, sample_points, select_mask


def _shape():
    m = np.zeros((60, 90), bool)
    m[10:50, 10:25] = True  # vertical bar
    m[25:35, 10:85] = True  # long horizontal arm
    return m


def test_instances_split_class_masks():
    m = np.zeros((20, 20), bool)
    m[1:5, 1:5] = True
    m[10:18, 10:18] = True
    m[0, 19] = True
    inst = instances(m)
    assert [i.sum() for i in inst] == [64, 16, 1]  # largest first
    assert not (inst[0] & inst[1]).any() and np.array_equal(inst[0] | inst[1] | inst[2], m)
    assert len(instances(m, min_pixels=2)) == 2


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_returns_points_inside_and_is_seeded(sampler):
    m = _shape()
    prob = np.where(m, 0.6, 0.0)
    a = sample_points(m, 5, sampler, np.random.default_rng(3), prob=prob)
    b = sample_points(m, 5, sampler, np.random.default_rng(3), prob=prob)
    assert a.shape == (5, 2) and np.array_equal(a, b)
    cols, rows = a[:, 0].astype(int), a[:, 1].astype(int)
    assert m[rows, cols].all()
    assert len({tuple(p) for p in a}) == 5


def test_skeleton_sampling_stays_near_the_skeleton_and_covers_cells():
    m = _shape()
    skel_dist = __import__("scipy").ndimage.distance_transform_edt(~skeletonize(m))
    near, cells = [], set()
    for seed in range(40):
        pts = sample_points(m, 5, "skeleton", np.random.default_rng(seed))
        for x, y in pts.astype(int):
            near.append(skel_dist[y, x] <= 3)
        # grid of eq. 2 over the bounding box (40 x 75, K = 5): points fall in distinct cells
        cell = np.sqrt(40 * 75 / 5)
        g1, g2 = int(np.ceil(40 / cell)), int(np.ceil(75 / cell))  # 3 x 5 cells
        ids = {(int(y - 10) * g1 // 40, int(x - 10) * g2 // 75) for x, y in pts}
        cells |= ids
        assert len(ids) == 5
    assert np.mean(near) > 0.6  # most points on or near the skeleton
    rand = [skel_dist[y, x] <= 3 for s in range(40) for x, y in sample_points(m, 5, "random", np.random.default_rng(s)).astype(int)]
    assert np.mean(near) > np.mean(rand) + 0.1  # measured: 0.76 vs 0.57
    assert len(cells) >= 8  # the grid's non-empty cells all get used over seeds


def test_center_boundary_topk_properties():
    m = _shape()
    d = distance_field(m)
    c = sample_points(m, 1, "center", np.random.default_rng(0)).astype(int)[0]
    assert d[c[1], c[0]] == d.max()
    b = sample_points(m, 5, "boundary", np.random.default_rng(0)).astype(int)
    raw = __import__("scipy").ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    assert all(raw[y, x] <= 2 for x, y in b)
    prob = np.zeros(m.shape)
    prob[30, 80] = 0.99
    assert tuple(sample_points(m, 1, "topk", np.random.default_rng(0), prob=prob)[0].astype(int)) == (80, 30)


def test_probability_sampler_follows_the_map():
    m = np.ones((10, 10), bool)
    prob = np.zeros((10, 10))
    prob[2, 3] = 1.0
    prob[7, 7] = 1.0
    pts = sample_points(m, 2, "probability", np.random.default_rng(0), prob=prob).astype(int)
    assert {tuple(p) for p in pts} == {(3, 2), (7, 7)}


def test_coverage_rule_picks_the_expected_candidate():
    weak = np.zeros((10, 10), bool)
    weak[2:8, 2:8] = True  # 36 px
    sub = np.zeros_like(weak)
    sub[3:5, 3:5] = True  # r = 4/36 < 0.3: too partial
    good = np.zeros_like(weak)
    good[2:8, 2:9] = True  # r = 1, p = 36/42 = 0.86
    huge = np.ones_like(weak)  # r = 1, p = 0.36 < 0.7: too large
    cands = np.stack([sub, good, huge])
    r, p = coverage_compatibility(cands, weak)
    assert r[0] == pytest.approx(4 / 36) and p[1] == pytest.approx(36 / 42)
    rng = np.random.default_rng(0)
    assert select_mask(cands, np.array([0.9, 0.5, 0.8]), "coverage", rng, weak=weak) == 1
    assert select_mask(cands, np.array([0.9, 0.5, 0.8]), "score", rng) == 0
    assert select_mask(cands, np.array([0.9, 0.5, 0.8]), "smallest", rng) == 0
    # no candidate passes both thresholds: the highest compatibility
    assert select_mask(np.stack([sub, huge]), np.zeros(2), "coverage", rng, weak=weak) == 0
