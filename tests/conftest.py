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

