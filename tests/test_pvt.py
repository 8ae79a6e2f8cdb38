"""PVT backbone: registry, paper parameter counts, equality with an official-formula reference, masks."""

import pytest
import torch

from benchmarks.official_design import OfficialPVT
from pvt_detr import build_backbone, list_backbones, load_pvt_checkpoint, register_backbone
from pvt_detr.backbone.patch_embed import PatchLinear, conv_weight_to_linear, linear_weight_to_conv
from pvt_detr.checkpoints import CheckpointError
from pvt_detr.nested_tensor import nested_tensor_from_tensor_list
from tests.conftest import perturb_

PAPER_PARAMS_M = {"pvt_tiny": 13.2, "pvt_small": 24.5, "pvt_medium": 44.2, "pvt_large": 61.4}
PAPER_DEPTHS = {"pvt_tiny": (2, 2, 2, 2), "pvt_small": (3, 4, 6, 3), "pvt_medium": (3, 4, 18, 3),
                "pvt_large": (3, 8, 27, 3)}


def test_registry_lists_paper_variants_and_rejects_duplicates():
    assert set(PAPER_PARAMS_M) <= set(list_backbones())
    before = list_backbones()
    with pytest.raises(ValueError, match="already registered"):

        @register_backbone
        def pvt_small(**kwargs):
            return None

    assert list_backbones() == before
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet50")


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    model = build_backbone(name, num_classes=1000)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.005, n
    assert model.depths == PAPER_DEPTHS[name]


@pytest.mark.parametrize("name", list_backbones())
def test_contract_channels_strides_any_size(name):
    model = build_backbone(name).eval()
    assert model.num_channels == list(model.embed_dims)
    assert model.feature_strides == [4, 8, 16, 32]
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert [f.shape[1] for f in feats] == model.num_channels
    assert [tuple(f.shape[2:]) for f in feats] == [(17, 25), (8, 12), (4, 6), (2, 3)]
    assert all(torch.isfinite(f).all() for f in feats)


def _conv_and_patch_linear() -> tuple[torch.nn.Conv2d, PatchLinear]:
    """A random stride-3 conv (5 -> 7 channels) and the PatchLinear holding its weights."""
    conv = torch.nn.Conv2d(5, 7, kernel_size=3, stride=3)
    lin = PatchLinear(5, 7, 3)
    with torch.no_grad():
        lin.weight.copy_(conv_weight_to_linear(conv.weight))
        lin.bias.copy_(conv.bias)
    return conv, lin


def test_patch_linear_equals_strided_conv():
    conv, lin = _conv_and_patch_linear()
    x = torch.randn(2, 5, 10, 13)
    expected = conv(x).permute(0, 2, 3, 1)
    torch.testing.assert_close(lin(x.permute(0, 2, 3, 1)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_weight_to_conv(lin.weight, 5, 3), conv.weight)


def test_patch_linear_slices_only_when_rows_or_columns_are_left_over():
    """Under symbolic tracing (torch.export) a no-op slice doubled the dynamo export time: divisible inputs do not
    slice; others drop the trailing rows/columns, as the stride-P conv does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    conv, lin = _conv_and_patch_linear()
    params = dict(lin.named_parameters())
    for hw, sliced in [((9, 12), False), ((10, 12), True), ((9, 13), True)]:
        x = torch.randn(2, *hw, 5)
        graph = make_fx(lambda x, p: torch.func.functional_call(lin, p, (x,)), tracing_mode="symbolic")(x, params).graph
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        assert any(t.startswith("aten.slice") for t in targets) == sliced, (hw, targets)
        torch.testing.assert_close(lin(x), conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(224, 224), (448, 448), (333, 517)])
def test_matches_official_formula_reference(hw):
    torch.manual_seed(1)
    ref = perturb_(OfficialPVT(depths=(2, 2, 2, 2))).eval()
    ours = build_backbone("pvt_tiny", drop_path_rate=0.0).eval()
    report = load_pvt_checkpoint(ours, ref.state_dict())
    assert sorted(report.unused) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert not report.missing
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected = ref(x)
        got = ours.forward_features(x)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_checkpoint_file_round_trip_and_errors(tmp_path):
    ref = perturb_(OfficialPVT(depths=(2, 2, 2, 2)))
    path = tmp_path / "pvt_tiny.pth"
    torch.save(ref.state_dict(), path)
    ours = build_backbone("pvt_tiny")
    load_pvt_checkpoint(ours, path)
    torch.testing.assert_close(ours.blocks[0][1].attn.sr.weight, conv_weight_to_linear(ref.block1[1].attn.sr.weight))
    torch.testing.assert_close(ours.pos_embed[3], ref.pos_embed4[:, 1:])
    deeper_model = build_backbone("pvt_small")
    untouched = {k: v.clone() for k, v in deeper_model.state_dict().items()}
    with pytest.raises(CheckpointError, match="missing"):
        load_pvt_checkpoint(deeper_model, path)  # pvt_tiny has fewer blocks
    assert all(torch.equal(v, untouched[k]) for k, v in deeper_model.state_dict().items())  # nothing was loaded
    # pvt_small's checkpoint into pvt_tiny: an error, not a partial load
    deeper = perturb_(OfficialPVT(depths=(3, 4, 6, 3))).state_dict()
    target = build_backbone("pvt_tiny")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    expected = r"no place in this backbone, e\.g\. blocks\.0\.2\..*depths are \[2, 2, 2, 2\]"
    with pytest.raises(CheckpointError, match=expected):
        load_pvt_checkpoint(target, deeper)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing was loaded
    bad = dict(ref.state_dict())
    bad["block1.0.attn.q.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"block1|blocks\.0\.0\.attn\.q\.weight.*shape"):
        load_pvt_checkpoint(build_backbone("pvt_tiny"), bad)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_pvt_checkpoint(ours, tmp_path / "missing.pth")


def test_checkpoint_trained_at_another_image_size_gets_its_positional_embeddings_resized():
    """A PVT trained at 384 x 384 stores 96/48/24/12 grids: they are resized on load, as the reference does at run
    time, so at 224 x 224 both compute the same features."""
    torch.manual_seed(2)
    ref = perturb_(OfficialPVT(depths=(2, 2, 2, 2))).eval()
    ref.grids = (96, 48, 24, 12)
    for i, g in enumerate(ref.grids):
        extra = 1 if i == 3 else 0
        setattr(ref, f"pos_embed{i + 1}", torch.nn.Parameter(torch.randn(1, g * g + extra, ref.head.in_features
                                                                         if i == 3 else (64, 128, 320)[i])))
    ours = build_backbone("pvt_tiny", drop_path_rate=0.0).eval()
    report = load_pvt_checkpoint(ours, ref.state_dict())
    assert report.resized == {f"pos_embed.{i}": f"resized from a {g} x {g} grid to {g * 7 // 12} x {g * 7 // 12}"
                              for i, g in enumerate(ref.grids)}
    assert "pos_embed.3: resized from a 12 x 12 grid to 7 x 7" in str(report)
    assert sorted(report.unused) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for e, g in zip(ref(x), ours.forward_features(x)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_classifier_loads_everything_and_runs():
    ref = perturb_(OfficialPVT(depths=(2, 2, 2, 2)))
    clf = build_backbone("pvt_tiny", num_classes=1000).eval()
    report = load_pvt_checkpoint(clf, ref.state_dict())
    assert not report.unused and not report.missing
    with torch.no_grad():
        logits = clf(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_padding_does_not_change_an_images_features():
    """Features of an image are the same alone or batched with a larger one (padded keys are masked)."""
    model = build_backbone("pvt_nano", drop_path_rate=0.0).eval()
    small, big = torch.randn(3, 100, 90), torch.randn(3, 160, 200)
    with torch.no_grad():
        alone = model.forward_nested(nested_tensor_from_tensor_list([small]))
        batched = model.forward_nested(nested_tensor_from_tensor_list([small, big]))
    for a, b in zip(alone, batched):
        fa, ma = a.decompose()
        fb, mb = b.decompose()
        h, w = fa.shape[2:]
        valid = ~ma[0]
        torch.testing.assert_close(fb[0, :, :h, :w][:, valid], fa[0][:, valid], rtol=1e-4, atol=1e-4)
        assert torch.equal(mb[0, :h, :w], ma[0]) and mb[0, h:].all() and mb[0, :, w:].all()
    # The mask marks exactly the tokens without real pixels: stage 1 (stride 4) of a 100 x 90 image.
    assert (~alone[0].mask[0]).sum(0).max() == 25 and (~alone[0].mask[0]).sum(1).max() == 23


def test_unpadded_nested_path_equals_plain_path():
    model = build_backbone("pvt_nano").eval()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        plain = model.forward_features(x)
        nested = model.forward_nested(nested_tensor_from_tensor_list(list(x)))
    for p, n in zip(plain, nested):
        torch.testing.assert_close(n.tensors, p)
        assert not n.mask.any()
