"""SSR-SAM's retrieval model: MSPG masking and tokens, prompt compression over any number of
prompts (none included), per-class decoding shapes, prompt sampling with replacement, frozen
parts, and the official SAM / torchvision ViT weight layouts."""

import pytest
import torch

pytest.importorskip("segment_anything")

from lowlabel.models import build_model  # noqa: E402
from lowlabel.models.ssr_sam import NOT_DECODABLE, PromptBank, PromptCompression, sample_prompts  # noqa: E402

SCRATCH = {"mspg": "tiny", "img_size": 64, "train_encoder": True, "train_mspg": True, "min_prompt_pixels": 4}


def _model(**options):
    torch.manual_seed(0)
    return build_model("ssr-sam", "scratch", 3, options={**SCRATCH, **options})


def test_mspg_sees_only_the_class_pixels():
    m = _model()
    x = torch.rand(2, 3, 48, 48)
    y = torch.zeros(2, 48, 48, dtype=torch.long)
    y[0, :10] = 1
    y[1, :, :20] = 2
    y[1, 0, 0] = 1  # 1 pixel of class 1: under min_prompt_pixels, no prompt
    tokens, classes = m.prompts_from(x, y)
    assert classes.tolist() == [0, 1, 0, 2] and tokens.shape == (4, 192)
    # class 1 of image 0 sees only its rows: changing pixels outside them leaves its prompt as is
    x2 = x.clone()
    x2[0, :, 10:] = torch.rand(3, 38, 48)
    t2, _ = m.prompts_from(x2, y)
    assert torch.allclose(t2[1], tokens[1], atol=1e-6) and not torch.allclose(t2[0], tokens[0])


def test_compression_takes_any_number_of_prompts_and_marks_empty_classes():
    comp = PromptCompression(3, 192, 256, queries=2)
    out, ok = comp([torch.randn(5, 192), torch.zeros(0, 192), torch.randn(1, 192)])
    assert out.shape == (3, 2, 256) and ok.tolist() == [True, False, True]
    # eq. 4 with one prompt: the softmax weight is 1, the output is W_v (proj(s))
    s = torch.randn(1, 192)
    out, _ = comp([s, s, s])
    assert torch.allclose(out[0], comp.v(comp.proj(s)).expand(2, -1), atol=1e-5)
    # permutation of a class's prompt set does not change its compressed prompt
    s = torch.randn(7, 192)
    a, _ = comp([s, s, s])
    b, _ = comp([s.flip(0), s, s])
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_decoding_one_map_per_class_with_the_bank_or_given_prompts():
    m = _model()
    x = torch.rand(2, 3, 48, 40)  # smaller than img_size: zero-padded, logits cropped back
    y = torch.randint(0, 2, (2, 48, 40))  # class 2 never labeled
    m.bank.add(*m.prompts_from(x, y))
    out = m(x)
    assert out.shape == (2, 3, 48, 40)
    assert (out[:, 2] == NOT_DECODABLE).all() and (out[:, :2] != NOT_DECODABLE).all()  # no prompt of class 2: never predicted
    k = sample_prompts(m.bank.all(), 3)
    assert [len(p) for p in k] == [3, 3, 0]
    assert m.decode(m.encode(x), x.shape[-2:], k).shape == (2, 3, 48, 40)
    with pytest.raises(ValueError, match="tile by tile"):
        m(torch.rand(1, 3, 80, 64))


def test_bank_is_a_fifo_per_class_and_samples_with_replacement():
    bank = PromptBank(2, 4, size=3)
    bank.add(torch.arange(5.0)[:, None].expand(5, 4), torch.tensor([0, 0, 0, 0, 1]))
    assert bank.get(0)[:, 0].tolist() == [3.0, 1.0, 2.0] and bank.get(1)[:, 0].tolist() == [4.0]  # the oldest (0) overwritten
    g = torch.Generator().manual_seed(0)
    draws = sample_prompts(bank.all(), 50, g)
    assert draws[1].shape == (50, 4) and (draws[1][:, 0] == 4).all()  # one prompt drawn 50 times: with replacement
    assert set(draws[0][:, 0].tolist()) == {1.0, 2.0, 3.0}
    state = bank.state_dict()
    other = PromptBank(2, 4, size=3)
    other.load_state_dict(state)
    assert torch.equal(other.get(0), bank.get(0))  # a checkpoint carries the bank


def test_frozen_parts_get_no_gradient_and_are_left_out_of_the_optimiser():
    m = _model(train_encoder=False, train_mspg=False)
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    tokens, classes = m.prompts_from(x, y)
    assert not tokens.requires_grad
    m.bank.add(tokens, classes)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    assert all(p.grad is None for p in m.encoder.parameters()) and all(p.grad is None for p in m.mspg.parameters())
    assert m.compression.q.grad is not None and m.mask_decoder.output_upscaling[0].weight.grad is not None
    groups = m.param_groups()
    assert groups["backbone"] == [] and len(groups["head"]) > 0


def test_labeled_pixels_of_a_class_without_prompts_leave_the_labeled_loss():
    from lowlabel.methods.base import supervised_loss
    from lowlabel.methods.ssr_sam import SSRSAMLabeledOnly, decodable_targets, labeled_prompts

    m = _model()
    x, y = torch.rand(2, 3, 48, 48), torch.zeros(2, 48, 48, dtype=torch.long)
    y[:, :20] = 1
    y[:, 40, :3] = 2  # 3 pixels of class 2 an image (min_prompt_pixels 4), none in the bank: not decodable
    prompts, _, _ = labeled_prompts(m, {"image": x, "mask": y})
    assert [len(s) for s in prompts] == [2, 2, 0]
    target = decodable_targets(y, prompts)
    assert (target[y == 2] == 255).all() and torch.equal(target[y != 2], y[y != 2])
    with torch.no_grad():
        logits = m.decode(m.encode(x), x.shape[-2:], prompts)
    assert supervised_loss(logits, y) > 10  # the 6 NOT_DECODABLE pixels alone add ~1e4 * 6 / 4608
    loss_x = SSRSAMLabeledOnly(num_classes=3, model=m).training_step(m, None, {"image": x, "mask": y}, None, None).losses["loss_x"]
    assert torch.isclose(loss_x, supervised_loss(logits, target), rtol=1e-4) and loss_x < 5


def test_training_says_when_the_mspg_stays_random_and_frozen(capsys):
    from types import SimpleNamespace

    from lowlabel.methods.ssr_sam import SSRSAMLabeledOnly

    run = SimpleNamespace(teacher_kind="none")
    SSRSAMLabeledOnly(num_classes=3, model=_model(train_mspg=False)).attach(run)
    assert "MSPG's ViT is frozen with random weights" in capsys.readouterr().out
    SSRSAMLabeledOnly(num_classes=3, model=_model(train_mspg=True)).attach(run)
    loaded = _model(train_mspg=False)
    loaded.load_weights(_model(train_mspg=False).state_dict())  # a whole SSR-SAM model: its MSPG comes with it
    SSRSAMLabeledOnly(num_classes=3, model=loaded).attach(run)
    assert "MSPG" not in capsys.readouterr().out


@pytest.mark.parametrize("encoder", ["vit_t", "vit_b"])
def test_official_checkpoint_layouts_load_strictly(tmp_path, encoder):
    """A SAM checkpoint (segment_anything's Sam, or MobileSAM) loads into g and h by its own key
    names; a torchvision ViT-B/16 state dict into the MSPG."""
    from segment_anything import sam_model_registry
    from torchvision.models import vit_b_16

    from lowlabel.models.segmenter import load_pretrained

    if encoder == "vit_t":
        from lowlabel.sam.mobilesam import build_mobile_sam

        official = build_mobile_sam()
    else:
        official = sam_model_registry["vit_b"]()
    torch.save(official.state_dict(), tmp_path / "sam.pth")
    vit = vit_b_16()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    m = build_model("ssr-sam", encoder, 2, options={"mspg_weights": str(tmp_path / "vit.pth")})
    assert torch.equal(m.mspg.vit.conv_proj.weight, vit.conv_proj.weight)
    load_pretrained(m, tmp_path / "sam.pth")
    for name, ours in (("image_encoder", m.encoder), ("mask_decoder", m.mask_decoder), ("prompt_encoder", m.prompt_encoder)):
        theirs = getattr(official, name).state_dict()
        assert ours.state_dict().keys() == theirs.keys()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    broken = {k: v for k, v in official.state_dict().items() if "neck" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained(m, tmp_path / "broken.pth")


def test_fit_fills_the_bank_and_a_reloaded_run_decodes_with_it(tiny_dataset, tmp_path):
    """ssr_sam trains end to end on the engine (scratch encoder and MSPG): every term of eq. 14
    present, the bank filled from the labeled images only, saved with the checkpoint; a run loaded
    from disk predicts with that bank (the same logits). The ablations drop their terms; another
    model is refused."""
    from lowlabel import load_run
    from lowlabel.api import fit
    from lowlabel.config import load_config
    from lowlabel.engine.trainer import Trainer
    from lowlabel.errors import ConfigError

    from .conftest import tiny_config

    model = {"arch": "ssr-sam", "encoder": "scratch", "options": {**SCRATCH, "img_size": 32}}
    with pytest.raises(ConfigError, match="eval.tile=64 exceeds"):
        Trainer(load_config(raw=tiny_config(tiny_dataset, tmp_path / "big", "ssr_sam", "self", model=model)), progress=False)
    raw = tiny_config(tiny_dataset, tmp_path / "runs", "ssr_sam", "self", iterations=2, model=model, eval={"tile": 32})
    run = fit(load_config(raw=raw), progress=False)
    records = [__import__("json").loads(line) for line in (tmp_path / "runs" / raw["name"] / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "loss_pp" in r)
    assert {"loss_x", "loss_fp", "loss_s", "loss_pp"} <= set(step)
    net = run.model
    assert int(net.bank.count.sum()) > 0
    x = torch.rand(1, 3, 32, 32)
    again = load_run(tmp_path / "runs" / raw["name"]).model
    assert torch.equal(again.bank.tokens, net.bank.tokens)
    net.eval(), again.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), again(x), atol=1e-5)

    for perturbations, absent in ((["prompt"], {"loss_fp", "loss_s"}), (["image", "feature"], {"loss_pp"})):
        r = tiny_config(tiny_dataset, tmp_path / "abl", "ssr_sam", "self", iterations=1, model=model, eval={"tile": 32})
        r["method"]["params"] = {"perturbations": perturbations}
        r["name"] = "-".join(perturbations)
        tr = Trainer(load_config(raw=r), progress=False)
        rec = tr.step(tr._to_device(next(tr.lab_stream.batches(0))), tr._to_device(next(tr.unl_stream.batches(0))))
        assert not absent & set(rec)
    base = tiny_config(tiny_dataset, tmp_path / "lo", "ssr_sam_labeled", "none", iterations=1, model=model, eval={"tile": 32})
    tr = Trainer(load_config(raw=base), progress=False)
    assert tr.unl_stream is None
    with pytest.raises(ConfigError, match="ssr-sam"):
        Trainer(load_config(raw=tiny_config(tiny_dataset, tmp_path / "x", "ssr_sam", "self")), progress=False)


def test_cache_hit_is_no_encoder_call_and_the_same_embedding():
    """A frozen encoder with cache_embeddings: a training input seen before is looked up (no
    encoder call, the same embedding, the same MSPG prompt); a changed pixel is a miss; eval mode
    bypasses the cache. A trained encoder cannot be cached."""
    m = _model(train_encoder=False, train_mspg=False, cache_embeddings=True).train()
    calls = []
    m.encoder.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
    m.mspg.register_forward_hook(lambda mod, i, o: calls.append(("mspg", i[0].shape[0])))
    x = torch.rand(2, 3, 48, 48)
    y = torch.zeros(2, 48, 48, dtype=torch.long)
    y[:, :20] = 1
    first = m.encode(x)[0]
    t1, _ = m.prompts_from(x, y)
    assert calls == [2, ("mspg", 4)]
    assert torch.equal(m.encode(x)[0], first) and torch.equal(m.prompts_from(x, y)[0], t1) and calls == [2, ("mspg", 4)]
    x2 = x.clone()
    x2[1, 0, 5, 5] += 0.01
    assert torch.equal(m.encode(x2)[0][0], first[0]) and calls[-1] == 1  # only the changed image is encoded
    assert m.cache.hits == 2 + 4 + 1 and m.cache.misses == 2 + 4 + 1
    m.eval()
    m.encode(x)
    assert calls[-1] == 2  # eval: no cache
    uncached = _model(train_encoder=False, train_mspg=False).eval()
    assert torch.allclose(uncached.encode(x)[0], first, atol=1e-6)
    with pytest.raises(ValueError, match="train_encoder false"):
        _model(train_encoder=True, cache_embeddings=True)


def test_cutmix_box_snapped_to_the_patch_grid():
    from lowlabel.methods.ssr_sam import patch_grid_box

    box = torch.zeros(1, 40, 40, dtype=torch.bool)
    box[0, 5:30, 12:20] = True  # rows 5..29 hold the centres 8, 24; columns 12..19 none (centres 8, 24, 40)
    cells, snapped = patch_grid_box(box, (4, 4), 16)
    assert cells.shape == (1, 4, 4) and not cells.any()
    box[0, :, 20:30] = True  # now column centre 24 is in
    cells, snapped = patch_grid_box(box, (4, 4), 16)
    assert cells[0].nonzero().tolist() == [[0, 1], [1, 1]]
    assert snapped.shape == box.shape and snapped[0, :32, 16:32].all() and snapped.sum() == 32 * 16


def test_cached_training_logs_hits_and_mixes_in_feature_space(tiny_dataset, tmp_path):
    """ssr_sam with a frozen, cached encoder on data.resize views: after the first pass over the
    data, inputs are looked up (hit rate > 0), and the image term is present. Without
    data.resize the cache is refused (random views never repeat)."""
    import json

    from lowlabel.api import fit
    from lowlabel.config import load_config

    from .conftest import tiny_config

    model = {"arch": "ssr-sam", "encoder": "scratch", "options": {**SCRATCH, "img_size": 32, "train_encoder": False, "train_mspg": False,
                                                                   "cache_embeddings": True}}
    raw = tiny_config(tiny_dataset, tmp_path / "runs", "ssr_sam", "self", iterations=6, model=model, eval={"tile": 32}, data={"resize": True})
    fit(load_config(raw=raw), progress=False)
    records = [json.loads(line) for line in (tmp_path / "runs" / raw["name"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "embedding_cache_hit_rate" in r]
    assert steps and steps[-1]["embedding_cache_hit_rate"] > 0 and all("loss_s" in r for r in steps)
    with pytest.raises(ValueError, match="data.resize: true"):
        load_config(raw={**raw, "data": {**raw["data"], "resize": False}})


def test_retrieve_cli_writes_a_mask_per_query(tiny_dataset, tmp_path):
    """lowlabel retrieve: the exemplar's masked region becomes one prompt, decoded alone on each
    query (tiled at the encoder's side); one 0/1 mask and one overlay per query. A semantic run
    of another model is refused."""
    import numpy as np
    from PIL import Image

    from lowlabel.api import fit
    from lowlabel.cli import main
    from lowlabel.config import load_config
    from lowlabel.engine.run import Run

    from .conftest import tiny_config

    model = {"arch": "ssr-sam", "encoder": "scratch", "options": {**SCRATCH, "img_size": 32}}
    raw = tiny_config(tiny_dataset, tmp_path / "runs", "ssr_sam_labeled", "none", iterations=1, model=model, eval={"tile": 32})
    fit(load_config(raw=raw), progress=False)
    run_dir = tmp_path / "runs" / raw["name"]
    images = sorted((tiny_dataset / "images").iterdir())
    ex_mask = tmp_path / "ex.png"
    m = np.zeros(Image.open(images[0]).size[::-1], np.uint8)
    m[5:20, 5:25] = 1
    Image.fromarray(m).save(ex_mask)
    assert main(["retrieve", str(images[1]), str(images[2]), "--model", str(run_dir), "--exemplar", str(images[0]), "--exemplar-mask", str(ex_mask),
                 "--out", str(tmp_path / "ret")]) == 0
    for q in images[1:3]:
        out = np.asarray(Image.open(tmp_path / "ret" / f"{q.stem}.png"))
        assert out.shape == Image.open(q).size[::-1] and set(np.unique(out)) <= {0, 1}
        assert (tmp_path / "ret" / "overlays" / f"{q.stem}.jpg").exists()
    run = Run.load(run_dir)
    (a,) = run.retrieve(images[0], ex_mask, [images[1]])
    net = run.model
    x = torch.from_numpy(np.array(Image.open(images[0]).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    prompt = net.exemplar_prompt(x, torch.from_numpy(m > 0))
    q = torch.from_numpy(np.array(Image.open(images[1]).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logit = net.decode_prompt(net.encode(q[..., :32, :32]), (32, 32), prompt)[0]
    sure = logit.abs().numpy()[:16, :16] > 1e-3  # batched tiles vs one: float noise may flip a logit of ~0
    assert sure.mean() > 0.9 and np.array_equal(a[:16, :16][sure], (logit > 0).numpy()[:16, :16][sure])  # only the first tile covers these
    with pytest.raises(ValueError, match="empty"):
        run.retrieve(images[0], np.zeros_like(m), [images[1]])
