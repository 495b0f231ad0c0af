import numpy as np
import torch

from lowlabel.augment.transforms import LabeledTransform, UnlabeledTransform, crop, cutmix_box, mix, rescale, rescale_crop, strong, weak


def _sample(h=40, w=60):
    mask = (torch.arange(w) // 10).repeat(h, 1) % 3
    img = torch.stack([mask.float() / 2, torch.zeros(h, w), torch.ones(h, w)])
    return {"image": img, "mask": mask.long(), "gt": mask.long(), "id": "x"}


def test_weak_moves_labels_with_pixels():
    for seed in range(10):
        out = weak(_sample(), np.random.default_rng(seed), size=48)
        assert out["image"].shape == (3, 48, 48) and out["mask"].shape == (48, 48)
        v = out["valid"]
        assert (out["mask"][~v] == 255).all() and (out["image"][:, ~v] == 0).all()
        # where valid, the label still equals the class encoded in the image's red channel
        cls = (out["image"][0] * 2).round().long()
        agree = (cls[v] == out["mask"][v]).float().mean()
        assert agree > 0.9
        assert torch.equal(out["mask"], out["gt"])


def test_augment_is_seeded():
    a = LabeledTransform(32)(_sample(), np.random.default_rng(5))
    b = LabeledTransform(32)(_sample(), np.random.default_rng(5))
    c = LabeledTransform(32)(_sample(), np.random.default_rng(6))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"]) or not torch.equal(a["mask"], c["mask"])


def test_strong_changes_only_colours():
    img = torch.rand(3, 20, 20)
    out = strong(img, np.random.default_rng(0), p_jitter=1.0, p_grey=0, p_blur=0)
    assert out.shape == img.shape and not torch.equal(out, img) and 0 <= out.min() and out.max() <= 1


def test_strong_view_of_a_multiband_image():
    """5 bands: the RGB bands get exactly the RGB view (same draws), the other bands the same
    brightness / contrast / blur; 1- and 2-band images get no colour operation."""
    img = torch.rand(5, 20, 20)
    for seed in range(12):
        out = strong(img, np.random.default_rng(seed))
        assert out.shape == img.shape and torch.allclose(out[:3], strong(img[:3].clone(), np.random.default_rng(seed)), atol=1e-6)
    dim = img * 0.5  # brightness factors <= 1.5 clip nothing
    bright = strong(dim, np.random.default_rng(0), jitter=(0.5, 0, 0, 0), p_jitter=1.0, p_grey=0, p_blur=0)
    f = bright[0, 0, 0] / dim[0, 0, 0]
    assert abs(f - 1) > 0.01 and torch.allclose(bright, dim * f, atol=1e-5)  # every band, one factor
    two = torch.rand(2, 20, 20)
    assert strong(two, np.random.default_rng(1), p_jitter=1.0).shape == two.shape


def test_unlabeled_views():
    s = UnlabeledTransform(32, n_strong=2, cutmix_p=1.0)({k: v for k, v in _sample().items() if k != "mask"}, np.random.default_rng(0))
    assert s["strong"].shape == (2, 3, 32, 32) and s["cutmix"].shape == (2, 32, 32) and s["cutmix"].any()
    assert "mask" not in s and s["valid"].dtype == torch.bool


def test_cutmix_box_and_mix_move_together():
    rng = np.random.default_rng(1)
    box = cutmix_box(50, 50, rng, p=1.0)
    frac = box.float().mean().item()
    assert 0.01 < frac <= 0.41
    assert not cutmix_box(50, 50, rng, p=0.0).any()
    b = box[None]
    img_a, img_b = torch.zeros(1, 3, 50, 50), torch.ones(1, 3, 50, 50)
    lab_a, lab_b = torch.zeros(1, 50, 50, dtype=torch.long), torch.ones(1, 50, 50, dtype=torch.long)
    conf_a, conf_b = torch.full((1, 50, 50), 0.2), torch.full((1, 50, 50), 0.9)
    im, lb, cf = mix(b, img_a, img_b), mix(b, lab_a, lab_b), mix(b, conf_a, conf_b)
    assert torch.equal(im[:, 0] == 1, lb == 1) and torch.equal(lb == 1, cf == 0.9) and torch.equal(lb[0] == 1, box)


def test_rescale_crop_matches_rescale_then_crop():
    """The window-only path draws the same numbers and yields the same pixels as resizing the
    whole image and cropping (labels exactly, image to float rounding), for enlargements,
    reductions and crops larger than the image."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        h, w = (int(v) for v in torch.randint(20, 300, (2,), generator=g))
        s = {"image": torch.rand(3, h, w, generator=g), "mask": torch.randint(0, 5, (h, w), generator=g), "valid": torch.ones(h, w, dtype=torch.bool)}
        size = int(torch.randint(16, 320, (1,), generator=g))
        r1, r2 = np.random.default_rng(trial), np.random.default_rng(trial)
        ref = crop(rescale(s, r1, (0.3, 3.0)), r1, size)
        new = rescale_crop(s, r2, size, (0.3, 3.0))
        assert r1.random() == r2.random()
        assert new["image"].shape == (3, size, size)
        assert torch.allclose(ref["image"], new["image"], atol=1e-4)
        assert torch.equal(ref["mask"], new["mask"]) and torch.equal(ref["valid"], new["valid"])


def test_source_coordinates_map_the_original_frame_onto_every_view(tiny_dataset):
    """``src_y`` / ``src_x`` move with the pixels through every augmentation (rescale + crop,
    flips, rot90, free rotation, whole-image resize): gathering the untransformed mask at them
    gives the transformed mask exactly; padding points nowhere."""
    from lowlabel.data.dataset import FolderDataset

    for kw in (dict(resize=True, rotate="medical"), dict(scale=(0.5, 2.0)), dict(scale=(2.0, 3.0), rotate="medical")):
        ds = FolderDataset(tiny_dataset, "train", coords=True, transform=LabeledTransform(32, **kw))
        for i in range(len(ds)):
            raw = torch.from_numpy(ds.load(i)["mask"].astype(np.int64))
            for epoch in range(6):
                s = ds[(i, epoch)]
                inside = (s["src_y"] >= 0) & (s["src_x"] >= 0)
                assert torch.equal(raw[s["src_y"][inside], s["src_x"][inside]], s["mask"][inside])
                assert (s["mask"][~inside] == 255).all()
