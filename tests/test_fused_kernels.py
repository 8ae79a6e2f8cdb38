"""The fused CPU kernels compute what the plain modules compute: chunked GELU MLP, dropout attention."""


import pytest
import torch
import torch.nn.functional as F

from pvt_detr.attention import MultiheadAttention, _DropoutAttention
from pvt_detr.backbone.mlp import Mlp
from pvt_detr.dropout import Dropout, dropout, keep_mask


def _plain(m: Mlp, x: torch.Tensor) -> torch.Tensor:
    return m.fc2(F.gelu(m.fc1(x)))


def test_fused_mlp_equals_plain_forward_and_gradients(small_chunks):
    m = Mlp(6, 8).double().train()
    x = torch.randn(2, 150, 6, dtype=torch.float64, requires_grad=True)
    assert m._fusable(x)
    y, ref = m(x), _plain(m, x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    for got, expected in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref)


def test_fused_mlp_gradcheck_and_frozen_weights(small_chunks):
    m = Mlp(3, 5).double()
    x = torch.randn(1, 130, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: m(x), (x, *m.parameters()))
    m.requires_grad_(False)  # only the input needs a gradient (a frozen backbone stage)
    (gx,) = torch.autograd.grad(m(x).sum(), x)
    (gx_ref,) = torch.autograd.grad(_plain(m, x).sum(), x)
    torch.testing.assert_close(gx, gx_ref)


def test_mlp_falls_back_to_plain_ops_with_dropout_in_training():
    m = Mlp(4, 8, drop=0.5).train()
    x = torch.randn(1, 3, 4)
    with torch.no_grad():
        assert not m._fusable(x)  # dropout is active
        assert m.eval()._fusable(x)  # inference: any size
    assert not m._fusable(x)  # training below MIN_FUSED_BYTES: plain ops


@pytest.mark.parametrize("padded", [False, True])
def test_dropout_attention_is_the_math_formula_with_the_same_random_draws(padded):
    """What SDPA's math path computes with dropout (softmax, drop, rescale, times v), with keep_mask's draws."""
    attn = MultiheadAttention(32, 4, dropout=0.3).train()
    q, kv = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 7, 32, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    if padded:
        pad[1, 4:] = True
    w, b = attn.in_proj_weight, attn.in_proj_bias

    def heads(t, i):  # (B, N, C) -> (B, nh, N, hd) through projection i of q, k, v
        return F.linear(t, w[32 * i : 32 * (i + 1)], b[32 * i : 32 * (i + 1)]).unflatten(-1, (4, 8)).transpose(1, 2)

    torch.manual_seed(7)
    got = attn(q, kv, kv, pad if padded else None)
    torch.manual_seed(7)
    keep = keep_mask((2, 4, 5, 7), 0.3)
    assert 0 < keep.sum() < keep.numel()
    scores = heads(q, 0) @ heads(kv, 1).transpose(-2, -1) / 8**0.5  # (B, nh, 5, 7)
    probs = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1) * keep / 0.7
    expected = attn.out_proj((probs @ heads(kv, 2)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    params = [q, kv, *attn.parameters()]
    for a, e in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(expected, params, g)):
        torch.testing.assert_close(a, e)


def test_dropout_attention_gives_zeros_for_a_fully_masked_image():
    attn = MultiheadAttention(8, 2, dropout=0.5).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    pad = torch.zeros(2, 3, dtype=torch.bool)
    pad[1] = True  # the second image has no key at all
    out = attn(x, x, x, pad)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out[1], attn.out_proj.bias.expand(3, 8))  # zero attention, then out_proj


def test_dropout_keeps_one_minus_p_rescaled_and_backpropagates_through_the_same_mask():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000, dtype=torch.float64) + 1.0
    x.requires_grad_()
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.9) < 0.002  # 1e6 draws: std 3e-4
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, kept.double() * 2.0 / 0.9)
    torch.manual_seed(5)
    first = dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(first, dropout(x, 0.3))  # seeded by the default generator
    module = Dropout(0.3)
    assert module.eval()(x) is x and dropout(x, 0.0) is x
    half = torch.ones(64, dtype=torch.bfloat16)  # half precision (autocast): F.dropout itself, same draws
    torch.manual_seed(3)
    plain = F.dropout(half, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(half, 0.5), plain)
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(1), dropout(t, 0.4))[1],
                                     (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),))


def test_dropout_attention_gradcheck():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.0, 0.0, float("-inf"), 0.0, 0.0], dtype=torch.float64).view(1, 1, 1, 5)

    def fn(q, k, v):
        torch.manual_seed(3)  # the same dropout draw for every evaluation
        return _DropoutAttention.apply(q, k, v, bias, 0.4, True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_inplace_inference_block_equals_the_plain_block(small_chunks, sr_ratio):
    """The inference path that adds both residuals into the caller's tensor computes the plain block's output,
    is taken only when asked, without autograd and in eval mode, and leaves the input alone otherwise."""
    from pvt_detr.backbone.pvt import Block

    torch.manual_seed(0)
    block = Block(32, 2, 4.0, sr_ratio, drop_path=0.1).eval()
    x = torch.randn(2, 6 * 10, 32)
    with torch.no_grad():
        plain = block(x, (6, 10))
        owned = x.clone()
        fused = block(owned, (6, 10), inplace=True)
    assert fused.data_ptr() == owned.data_ptr()  # written into the caller's tensor
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert not torch.equal(plain, x)
    untouched = x.clone()
    block(untouched, (6, 10), inplace=True)  # autograd on: the plain path, input unchanged
    assert torch.equal(untouched, x)
    block.train()
    with torch.no_grad():
        block(untouched, (6, 10), inplace=True)  # training mode (drop path active): the plain path
    assert torch.equal(untouched, x)


def test_fused_transformer_inference_equals_the_autograd_path():
    """Without autograd on the CPU the post-norm layers add residuals in place and run the FFN chunked (ReLU in
    place): the same outputs as the plain ops, also after in-place weight updates; not in training mode."""
    from pvt_detr.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
                        dropout=0.1).double().eval()
    for p in model.parameters():  # DETR zero-initialises biases; random ones make the check meaningful
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.5)
    src, pos = torch.randn(2, 12, 32, dtype=torch.float64), torch.randn(2, 12, 32, dtype=torch.float64)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 9:] = True
    query = torch.randn(5, 32, dtype=torch.float64)
    with torch.no_grad():
        hs, memory = model(src, mask, query, pos)
    src_grad = src.clone().requires_grad_()  # autograd on: the plain ops
    hs_ref, memory_ref = model(src_grad, mask, query, pos)
    torch.testing.assert_close(memory, memory_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hs, hs_ref.detach(), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # nothing derived from the weights is kept between calls
        model.decoder.layers[1].multihead_attn.in_proj_weight[40:].mul_(-2.0)
        model.decoder.layers[2].multihead_attn.in_proj_bias[70:].add_(1.0)
        hs_updated, _ = model(src, mask, query, pos)
    hs_updated_ref, _ = model(src.clone().requires_grad_(), mask, query, pos)
    assert not torch.allclose(hs_updated, hs)
    torch.testing.assert_close(hs_updated, hs_updated_ref.detach(), rtol=1e-10, atol=1e-10)
    model.train()  # training mode without autograd: dropout still applies (plain path)
    with torch.no_grad():
        torch.manual_seed(1)
        first, _ = model(src, mask, query, pos)
        torch.manual_seed(2)
        second, _ = model(src, mask, query, pos)
    assert not torch.allclose(first, second)
