"""Neighbourhood attention and PVT's optional local-mixing layers: formula, locality init, masks, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import main
from pvt_detr import ModelConfig, build_backbone, build_model, load_pvt_checkpoint
from pvt_detr.backbone.local_attention import NeighbourhoodAttention
from pvt_detr.nested_tensor import nested_tensor_from_tensor_list


def _reference(layer: NeighbourhoodAttention, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Straightforward per-token loop: softmax over the valid k x k neighbours (and the token itself)."""
    B, H, W, C = x.shape
    r, nh, d = layer.kernel_size // 2, layer.num_heads, layer.qk_dim
    qk = x @ layer.qk.weight.T + layer.qk.bias  # (B, H, W, 2 * nh * d)
    q, key = qk[..., : nh * d].reshape(B, H, W, nh, d), qk[..., nh * d:].reshape(B, H, W, nh, d)
    v = x @ layer.v.weight.T + layer.v.bias  # (B, H, W, C)
    out = torch.zeros(B, H, W, nh * C)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                for h in range(nh):
                    logits, values = [], []
                    for n, (dy, dx) in enumerate((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)):
                        y, z = i + dy, j + dx
                        inside = 0 <= y < H and 0 <= z < W
                        if not ((inside and valid[b, y, z]) or (dy == 0 and dx == 0)):
                            continue
                        logits.append(q[b, i, j, h] @ key[b, y, z, h] / math.sqrt(d) + layer.rel_bias[h, n])
                        values.append(v[b, y, z])
                    weights = torch.stack(logits).softmax(0)
                    out[b, i, j, h * C:(h + 1) * C] = (weights[:, None] * torch.stack(values)).sum(0)
    return out @ layer.proj.weight.T + layer.proj.bias  # (B, H, W, C)


def test_neighbourhood_attention_equals_the_per_token_formula_with_padding():
    torch.manual_seed(0)
    layer = NeighbourhoodAttention(6, kernel_size=3, num_heads=3, qk_dim=4)
    with torch.no_grad():
        layer.rel_bias.normal_()
    x = torch.randn(2, 5, 7, 6)
    valid = torch.ones(2, 5, 7, dtype=torch.bool)
    valid[1, 3:] = False  # image 1: 3 x 5 real tokens, the rest padding
    valid[1, :, 5:] = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x, valid), _reference(layer, x, valid), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), _reference(layer, x, torch.ones(2, 5, 7, dtype=torch.bool)),
                                   rtol=1e-5, atol=1e-5)


def test_locality_init_starts_as_a_3x3_convolution():
    """Head h points at neighbour h: with constant queries/keys the interior equals a 3 x 3 convolution."""
    torch.manual_seed(0)
    C = 4
    layer = NeighbourhoodAttention(C, locality_strength=30.0)
    assert layer.num_heads == 9 and torch.equal(layer.rel_bias.argmax(1), torch.arange(9))
    with torch.no_grad():
        layer.qk.weight.zero_()
        x = torch.randn(2, 6, 7, C)
        out = layer(x)
        v = F.linear(x, layer.v.weight, layer.v.bias).permute(0, 3, 1, 2)  # (B, C, H, W)
        taps = layer.proj.weight.view(C, 9, C).permute(0, 2, 1).reshape(C, C, 3, 3)  # (out, in, ky, kx)
        conv = F.conv2d(v, taps, layer.proj.bias, padding=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(out[:, 1:-1, 1:-1], conv[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def test_bad_kernel_size_is_refused():
    with pytest.raises(ValueError, match="odd"):
        NeighbourhoodAttention(8, kernel_size=2)


def test_pvt_local_layers_keep_padding_invariance_and_learn_their_bias():
    model = build_backbone("pvt_nano", drop_path_rate=0.0, local_layers=(1, 2, 0, 0), out_indices=(0, 1)).eval()
    assert [len(m.attn) for m in model.local[:2]] == [1, 2]
    assert "local.1.attn.1.rel_bias" in model.state_dict()
    assert not any(k.startswith(("local.2", "local.3")) for k in model.state_dict())
    small, big = torch.randn(3, 40, 56), torch.randn(3, 64, 64)
    with torch.no_grad():
        alone = model.forward_nested(nested_tensor_from_tensor_list([small]))
        batched = model.forward_nested(nested_tensor_from_tensor_list([small, big]))
    for a, b in zip(alone, batched):
        h, w = a.tensors.shape[2:]
        torch.testing.assert_close(b.tensors[0, :, :h, :w], a.tensors[0], rtol=1e-4, atol=1e-4)
    model.train()
    sum(f.sum() for f in model.forward_features(torch.randn(1, 3, 32, 32))).backward()
    bias_grads = [m.attn[0].rel_bias.grad for m in model.local[:2]]
    assert all(g is not None and g.abs().sum() > 0 for g in bias_grads)


def test_default_is_pvt_v1_and_bad_local_layers_are_refused():
    assert not [k for k in build_backbone("pvt_small").state_dict() if k.startswith("local.")]
    with pytest.raises(ValueError, match="local_layers must be >= 0"):
        build_backbone("pvt_nano", local_layers=(1, -1, 0, 0))
    with pytest.raises(ValueError, match=r"--local_layers needs 4 values \(one per stage\), got 2"):
        build_model(ModelConfig.from_any({"backbone": "pvt_nano", "local_layers": [1, 1]}))
    with pytest.raises(SystemExit):
        main.get_args_parser().parse_args(["--backbone", "pvt_nano", "--local_layers", "1,1"])


def test_official_checkpoint_fills_a_pvt_with_local_layers_and_reports_them_missing():
    from benchmarks.official_design import OfficialPVT
    from tests.conftest import perturb_

    ref = perturb_(OfficialPVT(depths=(2, 2, 2, 2)))
    model = build_backbone("pvt_tiny", local_layers=(1, 0, 0, 0))
    local_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("local.")}
    report = load_pvt_checkpoint(model, ref.state_dict())
    assert sorted(report.missing) == sorted(local_before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in local_before.items())
    torch.testing.assert_close(model.pos_embed[3], ref.pos_embed4[:, 1:])
