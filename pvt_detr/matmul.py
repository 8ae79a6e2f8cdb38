"""Float32 linear maps on the CPU through oneDNN, PyTorch's bundled MKL-DNN, with MKL as the fallback.

PyTorch multiplies float32 matrices on the CPU with MKL, which runs its AVX-512 kernels only on Intel processors:
on an AMD Zen 4/5 it takes its AVX2 path, at half the rate oneDNN reaches on the same cores (2048^2 on 2 threads:
133 against 391 GFLOP/s; the model's shapes: 1.5-2.5x, its backward products 1.3-2x). oneDNN chooses its kernels by
instruction set, on any vendor's CPU. `torch.ops.mkldnn._linear_pointwise` (the op Inductor's CPU backend emits for
frozen linears) computes x W^T + b on dense tensors, optionally followed by GELU / ReLU or plus another tensor.

`linear` is F.linear with that forward and a backward made of the same op (dX = dY W, dW = dY^T X), so training
uses it too. The arithmetic stays IEEE float32 (no bf16/tf32 "fast math" mode is set); results differ from MKL's
only by summation order. oneDNN is used when `onednn_applies` holds: float32 on an x86-64 CPU, MKL-DNN available and
enabled (`torch.backends.mkldnn.enabled = False` turns it off), no autocast, nothing compiled or exported (the
graph keeps plain `linear` ops), and a product large enough that oneDNN's thread start-up does not dominate
(below MIN_MACS, MKL's single-threaded small kernels are faster). Otherwise the plain PyTorch ops run.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

from pvt_detr.nested_tensor import is_exporting

# Multiply-adds below which MKL is as fast or faster (measured on 2 threads: 16 x 256 x 256 equal, 4 x 256 x 256
# 43 vs 68 us, 32 x 256 x 256 oneDNN ahead).
MIN_MACS = 1 << 21


# x86-64 only: where it was measured (on Arm, PyTorch's MKL-DNN is built on the Arm Compute Library instead).
ONEDNN_AVAILABLE = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn(t: torch.Tensor, macs: int) -> bool:
    return (ONEDNN_AVAILABLE and torch.backends.mkldnn.enabled and t.device.type == "cpu" and t.dtype == torch.float32
            and macs >= MIN_MACS and not torch.is_autocast_enabled("cpu") and not is_exporting())


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `linear(x, weight)` runs on oneDNN (see the module docstring)."""
    return weight.dtype == x.dtype and _onednn(x, x.numel() * weight.shape[0])


def _lp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"):
    """oneDNN: x (M, K) @ weight (N, K)^T + bias, then the activation ("none", "gelu" = exact erf, "relu")."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dy (M, N) @ weight (N, K) -> (M, K): the input gradient of a linear map."""
    if _onednn(dy, dy.numel() * weight.shape[1]):
        return _lp(dy, weight.t())  # oneDNN reads the transposed 'weight' strided
    return torch.mm(dy, weight)


def weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy (M, N)^T @ x (M, K) -> (N, K): the weight gradient of a linear map."""
    if not _onednn(dy, dy.numel() * x.shape[1]):
        return torch.mm(dy.t(), x)
    # oneDNN copies its input contiguous but reads its 'weight' strided: transpose the narrower operand into the
    # input (1.3-4x faster than the other way round on this model's shapes).
    if dy.shape[1] <= x.shape[1]:
        return _lp(dy.t(), x.t())  # (N, K)
    return _lp(x.t(), dy.t()).t().contiguous()  # (K, N) -> (N, K)


class _Linear(torch.autograd.Function):
    """x (M, K) @ W^T + b on oneDNN, forward and backward; saves x and W, as F.linear does."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _lp(x, weight, bias)  # (M, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()  # (M, N)
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = input_grad(dy, weight) if need_x else None  # (M, K)
        dw = weight_grad(dy, x) if need_w else None  # (N, K)
        db = dy.sum(0) if need_b and ctx.has_bias else None  # (N,)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x (..., K), weight (N, K), bias (N,) -> (..., N), forward and backward on oneDNN where it applies."""
    if not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _Linear.apply(x2, weight, bias)
    else:
        y = _lp(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])  # (..., N)


_INPLACE_ACTIVATIONS = {"none": None, "gelu": torch.ops.aten.gelu_, "relu": torch.relu_}


def linear_act(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """Without autograd: act(x2 W^T + b) for x2 (M, K) -> a new (M, N) tensor; act: "none", "gelu" or "relu".

    oneDNN applies the activation to its output tiles while they are in cache.
    """
    if onednn_applies(x2, weight):
        return _lp(x2, weight, bias, activation)
    y = torch.addmm(bias, x2, weight.t())  # (M, N)
    act_ = _INPLACE_ACTIVATIONS[activation]
    return y if act_ is None else act_(y)


def linear_add(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Without autograd: residual + x2 W^T + b for x2 (M, K), residual (M, N) -> a new (M, N) tensor."""
    if onednn_applies(x2, weight):
        return torch.ops.mkldnn._linear_pointwise.binary(x2, residual, weight, bias, "add")
    return torch.addmm(residual, x2, weight.t()).add_(bias)


def linear_add_(residual: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Without autograd: residual (M, N) += x2 (M, K) W^T + b in place; returns residual."""
    if onednn_applies(x2, weight):
        return residual.copy_(torch.ops.mkldnn._linear_pointwise.binary(x2, residual, weight, bias, "add"))
    return residual.add_(bias).addmm_(x2, weight.t())


class Linear(nn.Linear):
    """nn.Linear (same parameters, init and state-dict keys) whose CPU float32 products run on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return linear(x, self.weight, self.bias)
