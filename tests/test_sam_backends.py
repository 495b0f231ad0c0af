"""Every backend through the whole path (image -> embedding -> masks) with random weights of the
real architecture, and the embedding cache."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

from lowlabel.sam import Prompts, build_segmenter
from lowlabel.sam.cache import EmbeddingCache


def _image():
    img = np.full((256, 512, 3), 40, np.uint8)
    img[60:140, 100:220] = (220, 60, 60)  # a red rectangle on grey
    return img


def test_classical_backend_segments_the_object_under_the_point():
    seg = build_segmenter("classical")
    emb = seg.embed(_image())
    out = seg.segment(emb, Prompts(points=[[[150, 100]], [[400, 200]]]))
    assert out.masks.shape == (2, 3, 256, 512) and out.scores.shape == (2, 3)
    rect = np.zeros((256, 512), bool)
    rect[60:140, 100:220] = True
    cover = [(m & rect).sum() / rect.sum() for m in out.masks[0]]
    leak = [(m & ~rect).sum() / max(m.sum(), 1) for m in out.masks[0]]
    assert all(lk < 0.05 for lk in leak)  # every granularity stays inside the object
    assert max(cover) > 0.85  # all of it but the blurred 1-2 px boundary strip (measured 0.88)
    assert [m.sum() for m in out.masks[0]] == sorted(m.sum() for m in out.masks[0])  # fine -> coarse
    assert not (out.masks[1] & rect).any()
    neg = seg.segment(emb, Prompts(points=[[[150, 100], [160, 110]]], labels=[[1, 0]]))
    assert not neg.masks[0].any()  # the negative point removes its segment
    boxed = seg.segment(emb, Prompts(points=[[[150, 100]]], boxes=[[100, 60, 160, 140]]))
    assert not boxed.masks[0, :, :, 161:].any()


@pytest.mark.parametrize("backend,model_type", [("sam", "vit_b"), ("mobilesam", None)])
def test_sam_whole_path_and_coordinates(backend, model_type):
    pytest.importorskip("segment_anything")
    seg = build_segmenter(backend, model_type=model_type)
    assert seg.weights_id == "random-seed0"
    img = _image()
    emb = seg.embed(img)  # 256 x 512 -> resized to 512 x 1024, padded to 1024 x 1024
    assert tuple(emb.data.shape) == (1, 256, 64, 64) and emb.meta["input_size"] == (512, 1024)
    out = seg.segment(emb, Prompts(points=[[[150, 100]], [[400, 200]]]))
    assert out.masks.shape == (2, 3, 256, 512) and out.masks.dtype == bool and tuple(out.low_res_logits.shape) == (2, 3, 256, 256)
    # coordinate handling, independent of the weights: a point at the centre of embedding cell
    # (i, j) after the x2 resize gets exactly that cell's dense positional encoding
    i, j = 10, 20
    x, y = (16 * j + 7.5) / 2, (16 * i + 7.5) / 2  # original pixels; SAM adds 0.5 to pixel coordinates
    pe = seg.sam.prompt_encoder
    coords = torch.as_tensor(seg.resize.apply_coords(np.array([[[x, y]]], np.float32), emb.original_size))
    sparse, _ = pe(points=(coords, torch.ones(1, 1, dtype=torch.long)), boxes=None, masks=None)
    point_pe = sparse[0, 0] - pe.point_embeddings[1].weight[0]
    dense = pe.get_dense_pe()[0, :, i, j]
    assert torch.allclose(point_pe, dense, atol=1e-4)
    other = pe.get_dense_pe()[0, :, i + 3, j - 2]
    assert not torch.allclose(point_pe, other, atol=1e-2)


def test_mobilesam_checkpoint_round_trip(tmp_path):
    pytest.importorskip("segment_anything")
    a = build_segmenter("mobilesam", seed=1)
    enc = a.sam.image_encoder
    n = sum(p.numel() for k, p in enc.named_parameters() if not k.startswith(("head", "norm_head")))
    assert 5.6e6 < n < 5.9e6  # MobileSAM paper: a 5.78M-parameter image encoder
    torch.save(a.sam.state_dict(), tmp_path / "mobile_sam.pt")
    b = build_segmenter("mobilesam", checkpoint=tmp_path / "mobile_sam.pt", seed=2)
    assert len(b.weights_id) == 16
    for k, v in a.sam.state_dict().items():
        assert torch.equal(v, b.sam.state_dict()[k]), k
    torch.save({"image_encoder.nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a vit_t SAM checkpoint"):
        build_segmenter("mobilesam", checkpoint=tmp_path / "bad.pt")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vit_l", "vit_h"])
def test_large_sam_architectures_build(model_type):
    pytest.importorskip("segment_anything")
    seg = build_segmenter("sam", model_type=model_type)
    out = seg.segment(seg.embed(_image()), Prompts(points=[[[150, 100]]]))
    assert out.masks.shape == (1, 3, 256, 512)


def test_sam2_whole_path():
    pytest.importorskip("sam2")
    seg = build_segmenter("sam2", model_type="sam2.1_hiera_t")
    emb = seg.embed(_image())
    out = seg.segment(emb, Prompts(points=[[[150, 100], [160, 110]], [[400, 200], [410, 190]]]))
    assert out.masks.shape == (2, 3, 256, 512) and out.scores.shape == (2, 3)
    one = seg.segment(emb, Prompts(points=[[[150, 100]]]), multimask=False)
    assert one.masks.shape == (1, 1, 256, 512)


@pytest.mark.parametrize("backend", ["mobilesam", "sam2"])
def test_decoder_features_are_prompt_conditioned_and_cover_the_image(backend):
    """S4M's SD reads the image features after the mask decoder's two-way transformer, one map
    per prompt, cropped to the grid that covers the image (SAM pads the resized image, SAM 2
    resizes it to the square)."""
    pytest.importorskip("sam2" if backend == "sam2" else "segment_anything")
    seg = build_segmenter(backend)
    emb = seg.embed(_image())  # 256 x 512
    f = seg.decoder_features(emb, Prompts(points=[[[150, 100]], [[400, 200]], [[150, 100]]]))
    assert tuple(f.shape) == ((3, 256, 32, 64) if backend == "mobilesam" else (3, 256, 64, 64))
    # the same prompt gives the same map (up to float rounding: CPU kernels may order sums
    # differently by batch position) and a different prompt a different one
    assert torch.allclose(f[0], f[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f[0], f[1], atol=1e-2)
    # not the encoder's embedding: the prompt tokens have attended to it
    if backend == "mobilesam":
        assert not torch.allclose(f[0], emb.data[0, :, :32, :64], atol=1e-2)


def test_classical_backend_has_no_decoder_features():
    seg = build_segmenter("classical")
    with pytest.raises(ValueError, match="no mask decoder"):
        seg.decoder_features(seg.embed(_image()), Prompts(points=[[[150, 100]]]))


def test_unknown_backend_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown backend"):
        build_segmenter("mobilesam9")
    pytest.importorskip("segment_anything")
    with pytest.raises(FileNotFoundError, match="weights list"):
        build_segmenter("sam", checkpoint=tmp_path / "nope.pth")


def _writer(root, q):
    seg = build_segmenter("classical")
    cache = EmbeddingCache(root)
    cache.get_or_embed(_image(), seg)
    q.put(cache.misses)


def test_cache_reads_on_second_run_and_survives_concurrent_writers(tmp_path):
    seg = build_segmenter("classical")
    cache = EmbeddingCache(tmp_path)
    a = cache.get_or_embed(_image(), seg)
    b = EmbeddingCache(tmp_path).get_or_embed(_image(), seg)
    assert cache.misses == 1
    assert np.array_equal(a.data["segments"], b.data["segments"]) and b.original_size == (256, 512)
    other = _image()
    other[0, 0] = 0
    assert cache.key(other, seg) != cache.key(_image(), seg)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "c"), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [q.get() for _ in procs]  # both finished
    files = list((tmp_path / "c").rglob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "c").rglob("*.tmp"))
    c = EmbeddingCache(tmp_path / "c")
    c.get_or_embed(_image(), seg)
    assert c.hits == 1


def test_mobilesam_matches_the_official_module_layout():
    """Every parameter and buffer name and shape of the official MobileSAM (``vit_t``) module,
    recorded from the official code, loads strictly into lowlabel's. (With the official module's
    random weights loaded, the two image encoders gave bit-identical 64 x 64 x 256 embeddings of a
    1024 x 1024 input; checked once on this machine, 2026-11-30, as the official package cannot
    be installed here.)"""
    import json
    from pathlib import Path

    layout = json.loads((Path(__file__).parent / "data" / "mobile_sam_layout.json").read_text())["keys"]
    seg = build_segmenter("mobilesam")
    ours = seg.sam.state_dict()
    assert {k: list(v.shape) for k, v in ours.items()} == layout
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(shape, generator=g) if ours[k].is_floating_point() else torch.zeros(shape, dtype=ours[k].dtype) for k, shape in layout.items()}
    seg.sam.load_state_dict(official, strict=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickled_object", "wrong_fields", "empty"])
def test_unreadable_cache_entries_are_recomputed(tmp_path, damage):
    seg = build_segmenter("classical")
    cache = EmbeddingCache(tmp_path)
    first = cache.get_or_embed(_image(), seg)
    path = cache.path(cache.key(_image(), seg))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "pickled_object":
        torch.save(torch.nn.Linear(2, 2), path)  # refused by weights_only loading
    elif damage == "wrong_fields":
        torch.save({"unexpected": 1}, path)
    else:
        path.write_bytes(b"")
    again = EmbeddingCache(tmp_path)
    emb = again.get_or_embed(_image(), seg)
    assert again.misses == 1 and np.array_equal(emb.data["segments"], first.data["segments"])
    assert EmbeddingCache(tmp_path).get_or_embed(_image(), seg) is not None and path.is_file()


def test_cache_key_follows_the_backend_code(monkeypatch):
    seg = build_segmenter("classical")
    cache = EmbeddingCache("unused")
    before = cache.key(_image(), seg)
    monkeypatch.setattr(type(seg), "code_modules", ("lowlabel.sam.prompts",))  # more code computes it now
    assert cache.key(_image(), seg) != before


def test_download_verifies_the_recorded_sha256(tmp_path, monkeypatch):
    import hashlib

    from lowlabel.errors import CheckpointError
    from lowlabel.sam import weights

    assert all(len(c.sha256) == 64 for c in weights.CHECKPOINTS.values())  # every listed file has one
    src = tmp_path / "src" / "w.pt"
    src.parent.mkdir()
    src.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    for sha, ok in ((good, True), ("0" * 64, False)):
        monkeypatch.setitem(weights.CHECKPOINTS, "x", weights.Checkpoint("x", "sam", "vit_b", src.as_uri(), sha, 1))
        if ok:
            path, digest = weights.download("x", tmp_path / "ok")
            assert digest == good and path.read_bytes() == b"weights"
        else:
            with pytest.raises(CheckpointError, match="does not match"):
                weights.download("x", tmp_path / "bad")
            assert not list((tmp_path / "bad").iterdir())  # nothing kept


def test_refine_refuses_random_weights(tiny_dataset, tmp_path, capsys):
    from lowlabel.cli import main
    from lowlabel.data.weak import weaken_dataset

    weak = weaken_dataset(tiny_dataset, "coarse", tmp_path / "w")
    assert main(["refine", str(weak), "--weak", "coarse", "--backend", "mobilesam", "--out", str(tmp_path / "r")]) == 2
    assert "--allow-random-weights" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["refine", str(weak), "--weak", "coarse", "--backend", "mobilesam", "--allow-random-weights", "--limit", "1", "--out", str(tmp_path / "r")]) == 0
