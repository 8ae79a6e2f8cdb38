"""Shared test set-up: deterministic, single-threaded-friendly torch, repo root importable."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def small_chunks(monkeypatch):
    """The fused MLP (pvt_detr/backbone/mlp.py) in chunks of 70 rows, so that small inputs span several chunks with a
    ragged last one, and fused at any size."""
    import pvt_detr.backbone.mlp as mlp_module

    monkeypatch.setattr(mlp_module, "_chunk_rows", lambda hidden_dim, element_size, chunk_bytes: 70)
    monkeypatch.setattr(mlp_module, "MIN_FUSED_BYTES", 0)



def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random, non-trivial LayerNorm affine parameters, biases and positional embeddings (the official design's own
    initialisation leaves them at 1, 0 and near 0), so that a comparison with the reference exercises every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1].startswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
            elif getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return module
