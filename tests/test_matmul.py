"""pvt_detr.matmul: oneDNN linear maps compute what F.linear / addmm compute, forward and backward, and are used
exactly where they apply."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pvt_detr.backbone.mlp as mlp_module
from pvt_detr import matmul
from pvt_detr.backbone.mlp import Mlp
from pvt_detr.matmul import Linear, input_grad, linear, linear_act, linear_add, linear_add_, weight_grad

pytestmark = pytest.mark.skipif(not matmul.ONEDNN_AVAILABLE, reason="this PyTorch build has no MKL-DNN")

TOL = {"rtol": 1e-5, "atol": 1e-5}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _mkldnn_enabled(enabled: bool):
    """torch.backends.mkldnn.enabled, the user's switch, set for a block."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _onednn_calls(fn) -> tuple[object, int]:
    with _Ops() as ops:
        out = fn()
    return out, ops.names.count("_linear_pointwise")


def _operands(M=300, K=96, N=80):
    g = torch.Generator().manual_seed(0)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)


@pytest.mark.parametrize("shape", [(300, 96, 80), (300, 80, 96)])  # both branches of weight_grad: N <= K, N > K
def test_linear_forward_and_gradients_equal_f_linear(shape):
    x, w, b = _operands(*shape)
    x = x.view(3, 100, -1)  # leading dims are flattened and restored
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    assert matmul.onednn_applies(x, w)
    y, calls = _onednn_calls(lambda: linear(*leaves))
    assert calls == 1 and y.shape == (3, 100, shape[2])
    ref = F.linear(*ref_leaves)
    torch.testing.assert_close(y, ref, **TOL)
    g = torch.randn_like(ref)
    grads, calls = _onednn_calls(lambda: torch.autograd.grad(y, leaves, g))
    assert calls == 2  # dX and dW on oneDNN, db a sum
    for got, expected in zip(grads, torch.autograd.grad(ref, ref_leaves, g)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_linear_with_frozen_weights_and_no_bias_computes_only_the_input_gradient():
    x, w, _ = _operands()
    x.requires_grad_()
    y = linear(x, w)
    torch.testing.assert_close(y, x @ w.t(), **TOL)
    (gx,), calls = _onednn_calls(lambda: torch.autograd.grad(y.square().sum(), [x]))
    assert calls == 1  # no weight gradient is computed
    torch.testing.assert_close(gx, (2 * (x @ w.t())) @ w, rtol=1e-4, atol=1e-4)


def test_plain_ops_where_onednn_does_not_apply():
    x, w, b = _operands()
    small = torch.randn(2, 96)
    cases = [lambda: linear(small, w, b),  # below MIN_MACS: MKL's small kernels are faster
             lambda: linear(x.double(), w.double(), b.double())]  # oneDNN here is float32 only
    assert not matmul.onednn_applies(small, w)
    for case in cases:
        assert _onednn_calls(case)[1] == 0
    with _mkldnn_enabled(False):
        y, calls = _onednn_calls(lambda: linear(x, w, b))
    assert calls == 0
    torch.testing.assert_close(y, F.linear(x, w, b), **TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not matmul.onednn_applies(x, w)


@pytest.mark.parametrize("enabled", [True, False])
def test_inference_kernels_equal_their_formulas_on_both_paths(enabled):
    x, w, b = _operands()
    residual = torch.randn(x.shape[0], w.shape[0])
    plain = x @ w.t() + b
    with torch.no_grad(), _mkldnn_enabled(enabled):
        assert matmul.onednn_applies(x, w) == enabled
        torch.testing.assert_close(linear_act(x, w, b), plain, **TOL)
        torch.testing.assert_close(linear_act(x, w, b, "gelu"), F.gelu(plain), **TOL)
        torch.testing.assert_close(linear_act(x, w, b, "relu"), F.relu(plain), **TOL)
        torch.testing.assert_close(linear_add(x, w, b, residual), residual + plain, **TOL)
        target = residual.clone()
        assert linear_add_(target, x, w, b) is target
        torch.testing.assert_close(target, residual + plain, **TOL)
        dy = torch.randn(x.shape[0], w.shape[0])
        torch.testing.assert_close(input_grad(dy, w), dy @ w, **TOL)
        torch.testing.assert_close(weight_grad(dy, x), dy.t() @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(weight_grad(x, dy), x.t() @ dy, rtol=1e-4, atol=1e-4)


def test_linear_module_keeps_nn_linear_parameters_and_state_dict():
    torch.manual_seed(3)
    ours = Linear(96, 80)
    torch.manual_seed(3)
    ref = torch.nn.Linear(96, 80)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(ours.weight, ref.weight)
    x = _operands()[0]
    with torch.no_grad():
        y, calls = _onednn_calls(lambda: ours(x))
    assert calls == 1
    torch.testing.assert_close(y, ref(x), **TOL)


def test_fused_float32_mlp_on_onednn_equals_plain_ops(small_chunks):
    m = Mlp(64, 512).train()
    x = torch.randn(2, 300, 64, requires_grad=True)
    y, calls = _onednn_calls(lambda: m(x))
    assert calls > 2  # fc1 whole, fc2 per chunk
    ref = m.fc2(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias)))
    torch.testing.assert_close(y, ref, **TOL)
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    for got, expected in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        out = x.detach().clone()
        mlp_module.mlp_add_(out, out, m.fc1, m.fc2)  # the inference residual form, in place
        torch.testing.assert_close(out, x + ref, **TOL)


def test_demo_training_step_has_the_same_loss_and_gradients_on_onednn_and_mkl():
    """The whole model (the demo's configuration: local layers, anchor queries, two-stage, focal loss) through
    every linear map of forward and backward: oneDNN and MKL differ only by rounding."""
    import main
    from pvt_detr import build_model
    from training.config import parse_args

    args = parse_args(main.get_args_parser(), ["--config", "configs/demo.yaml", "--num_classes", "8"])
    model, criterion, _ = build_model(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g)
    targets = [{"labels": torch.randint(1, 8, (3,), generator=g),
                "boxes": torch.cat([torch.rand(3, 2, generator=g) * 0.5 + 0.25, torch.full((3, 2), 0.2)], 1)}
               for _ in range(4)]

    def forward_backward() -> torch.Tensor:
        losses = criterion(model.train()(images), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        loss.backward()
        return loss.detach()

    def step(enabled: bool):
        model.zero_grad()
        with _mkldnn_enabled(enabled):
            loss, calls = _onednn_calls(forward_backward)
        return loss, calls, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, calls, grads = step(True)
    ref_loss, ref_calls, ref_grads = step(False)
    assert calls > 20 and ref_calls == 0  # forward and backward ran on oneDNN, then without it
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 50
    for name, grad in grads.items():
        rel = (grad - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
        assert rel < 1e-4, (name, float(rel))
