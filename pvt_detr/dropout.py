"""Dropout whose random mask costs less on the CPU.

`F.dropout` draws its mask with `bernoulli_`, which on the CPU takes about 5 ns per element: in DETR's training
step (dropout 0.1 after every attention map, FFN and residual branch) the draws were 20 % of the transformer's
forward + backward time. `keep_mask` draws one 31-bit integer per element and compares it with (1 - p) * 2^31,
which is about twice as fast and keeps an element with probability 1 - p to within 2^-31. Off the CPU, for
half-precision tensors (autocast), under graph capture and in evaluation `Dropout` is `nn.Dropout` unchanged.
The random stream differs from `F.dropout`'s (both are seeded by the same generator), so runs are reproducible
but not draw-for-draw equal to plain PyTorch's.

The mask is kept as bool (1 byte per element, as `F.dropout` saves it) and applied through `mask_as`: on the CPU,
PyTorch converts bool to float slowly (0.9 ms per million elements on a 2-core machine) and multiplies float by
bool slower still (5 ms), against 0.15 ms for the same conversion from uint8 and 0.3 ms for a float product.
"""

from __future__ import annotations

import torch
from torch import nn

from pvt_detr.nested_tensor import is_exporting


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of `shape`, each element True (kept) with probability 1 - p, from the default generator."""
    threshold = round((1.0 - p) * 2**31)  # random_() on int32 draws uniformly from [0, 2^31)
    return torch.empty(shape, dtype=torch.int32, device=device).random_() < threshold


def mask_as(keep: torch.Tensor, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A bool mask as a tensor of `like`'s dtype holding `scale` where True and 0 elsewhere (same shape as keep)."""
    return keep.view(torch.uint8).to(like.dtype).mul_(scale)


class _MaskedScale(torch.autograd.Function):
    """x * keep / (1 - p), saving only the bool mask for backward (as `F.dropout` does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(keep)
        return mask_as(keep, x, scale).mul_(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return mask_as(keep, grad, ctx.scale).mul_(grad), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` with `keep_mask`'s cheaper draw on the CPU: (...) -> (...)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or is_exporting() or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """`nn.Dropout` (same arguments, no parameters) that draws its CPU mask with `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (...) -> (...)."""
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
