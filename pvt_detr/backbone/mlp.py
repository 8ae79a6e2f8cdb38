"""PVT's transformer-block MLP (Linear -> GELU -> Linear) and a fused, token-chunked CPU implementation of it.

On the CPU the plain MLP of the high-resolution stages is bound by memory, not arithmetic: at 800 x 1216 the
stage-1 hidden activation is 60800 x 512 floats (124 MB), written by fc1, read and rewritten by GELU, read by
fc2, every pass on freshly page-faulted memory. `gelu_mlp` instead walks the tokens in cache-sized chunks
(fc1 -> GELU -> fc2 per chunk; in inference GELU is oneDNN's post-op of fc1, see `pvt_detr.matmul`). In training
it saves only the input for backward and recomputes fc1 and GELU chunk by chunk there, so no hidden-sized tensor
is kept between forward and backward or materialised whole. Recomputing fc1 adds ~5 % to a training step's FLOPs
(pvt_small, 512 x 512) but no measurable time (the (M, H) tensors it replaces were page-faulted in afresh every
step), and it lowers the peak memory of a 800 x 1216 training step by ~1 GB. Same function, same parameters and
checkpoint keys as the plain module; results equal up to float rounding. Plain ops are used off the CPU, under
autocast, with dropout in training, while exporting, and in training below MIN_FUSED_BYTES (where they are as fast).
`mlp_add_` is the inference form that adds the MLP into a residual in place; DETR's ReLU FFN uses it too.
"""

from __future__ import annotations

import torch
from torch import nn

from pvt_detr.matmul import Linear, input_grad, linear_act, linear_add_, weight_grad
from pvt_detr.nested_tensor import is_exporting

# Hidden-activation bytes per chunk and per thread (each op splits a chunk's rows over the threads). 2 MiB per thread
# was the fastest of 0.5 - 8 MiB in whole-model timings on this project's AMD Zen 5 machine (2 MiB L2 per core),
# training and inference alike; larger chunks also come from mmap and are page-faulted in on every call.
CHUNK_BYTES_TRAIN = 1 << 21
CHUNK_BYTES_INFER = 1 << 21
MIN_FUSED_BYTES = 1 << 24  # training: below 16 MiB of hidden activation the plain ops are as fast (measured)


def _chunk_rows(hidden_dim: int, element_size: int, chunk_bytes: int) -> int:
    return max(64, chunk_bytes * torch.get_num_threads() // (hidden_dim * element_size))


class _GeluMlpFunction(torch.autograd.Function):
    """fc2(gelu(fc1(x))) over (M, C) rows, chunked; saves only x and the weights, and recomputes each chunk's fc1
    pre-activation in backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, rows: int):
        ys = [linear_act(linear_act(x[s : s + rows], w1, b1, "gelu"), w2, b2)  # (m, H) -> (m, C_out)
              for s in range(0, x.shape[0], rows)]
        ctx.rows = rows
        ctx.save_for_backward(x, w1, b1, w2)
        return torch.cat(ys)  # (M, C_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w1, b1, w2 = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        rows = ctx.rows
        dxs = []
        dw1 = torch.zeros_like(w1) if need_w1 else None
        db1 = torch.zeros(w1.shape[0], dtype=x.dtype) if need_b1 else None
        dw2 = torch.zeros_like(w2) if need_w2 else None
        db2 = dy.sum(0) if need_b2 else None
        for s in range(0, x.shape[0], rows):
            dyc, xc = dy[s : s + rows], x[s : s + rows]  # (m, C_out), (m, C)
            h = linear_act(xc, w1, b1)  # (m, H) fc1 again: cheaper than keeping (M, H) floats for backward
            if need_w2:
                dw2 += weight_grad(dyc, torch.ops.aten.gelu(h))  # (C_out, H)
            dg = input_grad(dyc, w2)  # (m, H)
            dh = torch.ops.aten.gelu_backward.grad_input(dg, h, grad_input=dg)  # (m, H)
            if need_b1:
                db1 += dh.sum(0)
            if need_w1:
                dw1 += weight_grad(dh, xc)  # (H, C)
            if need_x:
                dxs.append(input_grad(dh, w1))  # (m, C)
        return torch.cat(dxs) if need_x else None, dw1, db1, dw2, db2, None


def _needs_grad(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or fc1.weight.requires_grad or fc2.weight.requires_grad)


def gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """fc2(GELU(fc1(x))) for x (..., C) on the CPU, chunked over tokens -> (..., C_out). Float32/64, no autocast."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, C)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if _needs_grad(x, fc1, fc2):
        rows = _chunk_rows(fc1.out_features, x.element_size(), CHUNK_BYTES_TRAIN)
        y = _GeluMlpFunction.apply(x2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, rows)  # (M, C_out)
    else:
        y = torch.empty(x2.shape[0], fc2.out_features, dtype=x.dtype)  # (M, C_out)
        _inference_chunks(x2, fc1, fc2, y, accumulate=False)
    return y.view(*lead, -1)  # (..., C_out)


def _inference_chunks(x2: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, out2: torch.Tensor, accumulate: bool,
                      activation: str = "gelu") -> None:
    """out2 (M, C_out) = (or += if accumulate) fc2(act(fc1(x2))) for x2 (M, C), chunk by chunk, no autograd.

    out2 may be x2 itself (accumulate=True): each chunk's rows are read by fc1 before fc2 writes them.
    """
    rows = _chunk_rows(fc1.out_features, x2.element_size(), CHUNK_BYTES_INFER)
    for s in range(0, x2.shape[0], rows):
        hc = linear_act(x2[s : s + rows], fc1.weight, fc1.bias, activation)  # (m, H)
        if accumulate:  # a residual sum: no output tensor
            linear_add_(out2[s : s + rows], hc, fc2.weight, fc2.bias)  # (m, C_out)
        else:
            out2[s : s + rows] = linear_act(hc, fc2.weight, fc2.bias)  # (m, C_out)


def mlp_add_(out: torch.Tensor, x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
             activation: str = "gelu") -> torch.Tensor:
    """out += fc2(act(fc1(x))) in place (act: "gelu" or "relu"), chunked over tokens, for contiguous out and x
    (..., C) on the CPU without autograd (the residual sum of an inference block: no output tensor and no
    bias-broadcast copy). out may be x itself. Returns out."""
    _inference_chunks(x.reshape(-1, x.shape[-1]), fc1, fc2, out.view(-1, out.shape[-1]), accumulate=True,
                      activation=activation)
    return out


def can_fuse_inference(x: torch.Tensor, *linears: nn.Linear) -> bool:
    """True where the hand-fused inference kernels apply: float32/64 on the CPU, no autograd recording, no
    autocast, not exporting or compiling, and every given Linear has a bias."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled()
            and not is_exporting() and not torch.is_autocast_enabled("cpu")
            and all(lin.bias is not None for lin in linears))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, with dropout; on the CPU without dropout it runs as the fused `gelu_mlp`."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def _fusable(self, x: torch.Tensor) -> bool:
        if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not is_exporting()
                and not torch.is_autocast_enabled("cpu") and (self.drop.p == 0 or not self.training)
                and self.fc1.bias is not None and self.fc2.bias is not None):
            return False
        hidden_bytes = x.numel() // x.shape[-1] * self.fc1.out_features * x.element_size()
        return hidden_bytes >= MIN_FUSED_BYTES or not _needs_grad(x, self.fc1, self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        if self._fusable(x):
            return gelu_mlp(x, self.fc1, self.fc2)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
