"""hubconf.py through torch.hub (source="local"): the entry points build main.py's models and load local weights."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
import torch

from benchmarks.official_design import OfficialPVT
from tests.conftest import perturb_
from tests.tiny_detector import ROOT, tiny_checkpoint

sys.path.insert(0, str(ROOT))  # hubconf and main, as torch.hub imports them
SMALL = dict(hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=10)


def _load(entry: str, *args, **kwargs):
    return torch.hub.load(str(ROOT), entry, *args, source="local", **kwargs)


def test_hub_entry_points_build_each_backbone():
    hubconf = importlib.import_module("hubconf")  # torch.hub.list reads GitHub repositories only
    entries = sorted(name for name, obj in vars(hubconf).items()
                     if inspect.isfunction(obj) and obj.__module__ == "hubconf" and not name.startswith("_"))
    assert entries == [
        "detector", "pvt_large_detr", "pvt_medium_detr", "pvt_small_detr", "pvt_tiny_detr"]
    for name, depths in (("tiny", [2, 2, 2, 2]), ("small", [3, 4, 6, 3]), ("medium", [3, 4, 18, 3]),
                         ("large", [3, 8, 27, 3])):
        model = _load(f"pvt_{name}_detr", **SMALL)
        assert [len(stage) for stage in model.backbone.blocks] == depths, name


def test_hub_model_is_main_pys_model_with_the_overrides():
    import main
    from pvt_detr import build_model

    model, post = _load("pvt_tiny_detr", num_classes=5, return_postprocessor=True, **SMALL)
    args = main.get_args_parser().parse_args(["--backbone", "pvt_tiny", "--num_classes", "5"])
    for key, value in SMALL.items():
        setattr(args, key, value)
    reference, _, postprocessors = build_model(args)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert model.class_embed.out_features == 6 and model.query_embed.num_embeddings == 10
    assert type(post) is type(postprocessors["bbox"])
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 96, 128))
    assert out["pred_logits"].shape == (1, 10, 6)
    assert bool(((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all())
    assert _load("pvt_tiny_detr", num_classes=None, **SMALL).class_embed.out_features == 92  # COCO's 91 + no-object
    with pytest.raises(TypeError, match="unknown option 'num_querys'"):
        _load("pvt_tiny_detr", num_querys=5)


def test_hub_model_loads_an_official_pvt_checkpoint(tmp_path):
    from pvt_detr import build_backbone, load_pvt_checkpoint

    # pvt_tiny's depths, official key names and conv weights
    official = perturb_(OfficialPVT(depths=(2, 2, 2, 2))).state_dict()
    path = tmp_path / "pvt_tiny.pth"
    torch.save(official, path)
    model = _load("pvt_tiny_detr", pretrained_backbone=str(path), **SMALL)
    expected = build_backbone("pvt_tiny", out_indices=(3,))
    load_pvt_checkpoint(expected, official)
    loaded = model.backbone.state_dict()
    assert loaded.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_hub_detector_from_a_training_checkpoint(tmp_path_factory):
    checkpoint, data = tiny_checkpoint(tmp_path_factory)
    detector = _load("detector", str(checkpoint), device="cpu")
    image = next((data / "val2017").glob("*.jpg"))
    [det] = detector.predict([str(image)], score_threshold=0.0)
    assert det.boxes.shape == (6, 4) and det.image_size == (80, 80)
    assert set(det.names) <= {"rectangle", "ellipse", "triangle"}
