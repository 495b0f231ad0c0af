import pytest
import torch

from lowlabel.models import build_model


@pytest.mark.parametrize(
    "arch,encoder",
    [("deeplabv3plus", "resnet18"), ("deeplabv3plus", "mobilenet_v2"), ("unet", "resnet18"), ("segformer", "mit_b0"),
     ("unet", "mit_b0"), ("tiny", "")],
)
def test_encode_decode_interface(arch, encoder):
    m = build_model(arch, encoder or "resnet18", num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    feats = m.encode(x)
    assert isinstance(feats, list) and len(feats) >= 3
    dec = m.decode_features(feats)
    assert dec.shape[1] == m.feature_channels
    logits = m.decode(feats, (64, 64))
    assert logits.shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), logits, atol=1e-5)
        assert m(torch.rand(1, 3, 50, 70)).shape == (1, 3, 50, 70)  # any size: padded then cropped
    groups = m.param_groups()
    assert groups["backbone"] and groups["head"]
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(m.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deeplabv3plus", "unet", "segformer"])
@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "resnet101", "mobilenet_v2", "mit_b0"])
def test_every_listed_architecture_builds(arch, encoder):
    if arch == "deeplabv3plus" and encoder.startswith("mit"):
        pytest.skip("smp: mit encoders do not support the dilation DeepLabV3+ needs")
    m = build_model(arch, encoder, num_classes=2).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_encode_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        build_model("tiny", num_classes=2).encode(torch.rand(1, 3, 30, 32))


def test_pretrained_from_local_file(tmp_path):
    src = build_model("unet", "resnet18", num_classes=2)
    torch.save(src.state_dict(), tmp_path / "full.pt")
    torch.save(src.encoder.state_dict(), tmp_path / "enc.pt")
    full = build_model("unet", "resnet18", num_classes=2, pretrained=tmp_path / "full.pt")
    enc = build_model("unet", "resnet18", num_classes=2, pretrained=tmp_path / "enc.pt")
    k = "conv1.weight"
    assert torch.equal(full.encoder.state_dict()[k], src.encoder.state_dict()[k])
    assert torch.equal(enc.encoder.state_dict()[k], src.encoder.state_dict()[k])
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_model("unet", "resnet18", num_classes=2, pretrained=tmp_path / "missing.pt")
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit"):
        build_model("unet", "resnet18", num_classes=2, pretrained=tmp_path / "other.pt")


def test_multiband_networks_and_rgb_weights_fitted_to_them(tmp_path):
    """in_channels 4 (RGB + NIR): the first three channels are normalised as RGB, the fourth as
    grey; RGB weights load with zeros on band 4, so the loaded network's output on RGB + any NIR
    equals the RGB network's on RGB. A grey network gets the RGB filters summed. A wrong number
    of channels is refused by name."""
    src = build_model("unet", "resnet18", num_classes=2).eval()
    torch.save(src.encoder.state_dict(), tmp_path / "rgb.pt")
    four = build_model("unet", "resnet18", num_classes=2, in_channels=4, pretrained=tmp_path / "rgb.pt").eval()
    four.decoder_net.load_state_dict(src.decoder_net.state_dict())
    four.head.load_state_dict(src.head.state_dict())
    assert four.mean.flatten().tolist()[:3] == pytest.approx([0.485, 0.456, 0.406]) and four.mean.flatten()[3] == pytest.approx(0.449, abs=1e-3)
    w = four.encoder.state_dict()["conv1.weight"]
    assert w.shape[1] == 4 and torch.equal(w[:, :3], src.encoder.state_dict()["conv1.weight"]) and not w[:, 3].any()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(four(torch.cat([x, torch.rand(1, 1, 64, 64)], 1)), src(x), atol=1e-5)
    grey = build_model("unet", "resnet18", num_classes=2, in_channels=1, pretrained=tmp_path / "rgb.pt")
    assert torch.allclose(grey.encoder.state_dict()["conv1.weight"], src.encoder.state_dict()["conv1.weight"].sum(1, keepdim=True))
    with pytest.raises(ValueError, match="takes 4 channel"):
        four(x)
    with pytest.raises(ValueError, match="takes RGB"):
        build_model("ssr-sam", "scratch", num_classes=2, in_channels=4)


def test_unknown_arch_and_encoder():
    with pytest.raises(ValueError, match="unknown model arch"):
        build_model("nope", "resnet18", 2)
    with pytest.raises(ValueError, match="encoder"):
        build_model("unet", "resnet9000", 2)
