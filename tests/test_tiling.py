import numpy as np
import pytest
import torch

from lowlabel.data.tiling import TileGrid, window_weights
from lowlabel.eval.inference import sliding_window


@pytest.mark.parametrize("h,w,tile,ov", [(100, 130, 32, 8), (32, 32, 32, 0), (20, 50, 32, 0.25), (257, 511, 64, 0.5)])
def test_grid_covers_every_pixel_and_stays_inside(h, w, tile, ov):
    g = TileGrid(h, w, tile, ov)
    cover = np.zeros((h, w), int)
    for y, x, th, tw in g:
        assert 0 <= y and y + th <= h and 0 <= x and x + tw <= w
        cover[y : y + th, x : x + tw] += 1
    assert cover.min() >= 1
    assert g.row_starts[-1] == max(0, h - tile)  # last window aligned to the edge


def test_grid_rejects_bad_overlap():
    with pytest.raises(ValueError):
        TileGrid(10, 10, 8, 8)


def test_gaussian_weights_peak_in_centre():
    w = window_weights(9, 9)
    assert w[4, 4] == w.max() and w[0, 0] < w[4, 4] and w.min() > 0


def _identity_model(num_classes):
    # "logits" whose argmax is the red channel's class and whose softmax is sharp
    def f(x):
        cls = (x[:, 0] * 255).round().long().clamp(0, num_classes - 1)
        return torch.nn.functional.one_hot(cls, num_classes).permute(0, 3, 1, 2).float() * 50
    return f


@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
def test_identity_model_reproduces_input(weighting):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (150, 211)).astype(np.uint8)
    img = np.stack([labels, labels, labels], -1)
    pred = sliding_window(_identity_model(5), img, 5, tile=64, overlap=16, weighting=weighting, batch_size=3, return_probs=True)
    assert (pred.labels == labels).all()
    assert pred.probs.shape == (5, 150, 211)
    assert torch.allclose(pred.probs.sum(0), torch.ones(150, 211), atol=1e-4)


def test_stitching_averages_overlaps():
    # each window predicts class 1 with probability = its mean red value; overlapping windows average
    def f(x):
        m = x[:, 0].mean(dim=(1, 2)).clamp(1e-4, 1 - 1e-4)
        logit = torch.log(m / (1 - m))[:, None, None, None].expand(-1, 1, *x.shape[-2:])
        return torch.cat([torch.zeros_like(logit), logit], 1)

    red = np.tile((np.arange(40) * 5).astype(np.uint8), (40, 1))
    img = np.stack([red, red * 0, red * 0], -1)
    pred = sliding_window(f, img, 2, tile=32, overlap=24, weighting="uniform", return_probs=True)
    w0 = (np.arange(0, 32) * 5).mean() / 255  # window at x=0
    w1 = (np.arange(8, 40) * 5).mean() / 255  # last window, aligned to the edge: x=8
    assert pred.probs[1, 5, 4].item() == pytest.approx(w0, abs=1e-4)
    assert pred.probs[1, 5, 20].item() == pytest.approx((w0 + w1) / 2, abs=1e-4)
    assert pred.probs[1, 5, 36].item() == pytest.approx(w1, abs=1e-4)


def test_sink_streams_rows_in_order():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (100, 70)).astype(np.uint8)
    img = np.stack([labels] * 3, -1)
    got = []
    pred = sliding_window(_identity_model(3), img, 3, tile=32, overlap=8, sink=lambda y, lab, c: got.append((y, lab)))
    assert pred.labels is None
    assert [y for y, _ in got] == sorted(y for y, _ in got) and got[0][0] == 0
    assert (np.concatenate([lab for _, lab in got]) == labels).all()


def test_stitched_scores_equal_a_whole_image_reference():
    """The row-band buffers against the plain sum over every window into a full-size array: a
    model whose output depends on the window (a conv with zero padding), windows overlapping in
    both directions, the last row and column aligned to the edge; sink and in-memory agree."""

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 5, padding=2)
    img = np.random.default_rng(2).integers(0, 256, (150, 211, 3)).astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    acc, acc_w = torch.zeros(4, 150, 211), torch.zeros(150, 211)
    wt = window_weights(64, 64, "gaussian")
    with torch.no_grad():
        for y, xx, h, w in (win for _, row in TileGrid(150, 211, 64, 0.25).rows() for win in row):
            acc[:, y : y + h, xx : xx + w] += model(x[None, :, y : y + h, xx : xx + w])[0].softmax(0) * wt
            acc_w[y : y + h, xx : xx + w] += wt
        ref = acc / acc_w
        pred = sliding_window(model, img, 4, tile=64, overlap=0.25, return_probs=True, batch_size=3)
        rows = []
        sliding_window(model, img, 4, tile=64, overlap=0.25, sink=lambda y, lab, c: rows.append(lab))
    assert torch.allclose(pred.probs, ref, atol=1e-5)
    assert np.array_equal(pred.labels, ref.argmax(0).numpy()) and np.array_equal(np.concatenate(rows), pred.labels)
