"""The whole detector against the official design (benchmarks/official_design.py), written from the papers' formulas.

Weights go from the official design into our model only through the public loaders, in the official formats: the
backbone as a PVT ImageNet state dict (`load_pvt_checkpoint`), the rest as a facebookresearch/detr checkpoint
(`load_detr_checkpoint`, with its 1 x 1 conv `input_proj`). Outputs, post-processed detections, losses (with the
logged class and cardinality errors) and gradients must then agree.
"""

import pytest
import torch

from benchmarks.official_design import build_official, official_postprocess
from pvt_detr import ModelConfig, build_model, load_detr_checkpoint, load_pvt_checkpoint
from pvt_detr.checkpoints import pvt_checkpoint_filter
from tests.conftest import perturb_

NUM_CLASSES, QUERIES = 5, 10
CONFIG = dict(backbone="pvt_tiny", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=128,
              num_queries=QUERIES, num_classes=NUM_CLASSES, dropout=0.0, drop_path=0.0)


def detr_checkpoint(official: torch.nn.Module) -> dict:
    """The official design's non-backbone weights in facebookresearch/detr's checkpoint format."""
    return {"model": {k: v.clone() for k, v in official.state_dict().items() if not k.startswith("backbone.")},
            "args": {"hidden_dim": CONFIG["hidden_dim"]}}


def official_and_ours(pre_norm: bool):
    config = ModelConfig(**CONFIG, pre_norm=pre_norm)
    torch.manual_seed(0)
    official, official_criterion = build_official(config)
    perturb_(official)
    torch.manual_seed(1)  # our own initialisation differs, so nothing passes by sharing it
    ours, criterion, postprocessors = build_model(config)
    backbone = {k[len("backbone."):]: v for k, v in official.state_dict().items() if k.startswith("backbone.")}
    backbone_report = load_pvt_checkpoint(ours.backbone, backbone)
    assert sorted(backbone_report.unused) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    report = load_detr_checkpoint(ours, detr_checkpoint(official))
    assert not report.skipped and not report.unused
    assert report.missing and all(k.startswith("backbone.") for k in report.missing)
    return official, official_criterion, ours, criterion, postprocessors


def assert_outputs_close(ours: dict, ref: dict, index=slice(None)):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(ours[key], ref[key][index], rtol=1e-4, atol=2e-5, msg=key)
    assert len(ours["aux_outputs"]) == len(ref["aux_outputs"]) == 2
    for a, b in zip(ours["aux_outputs"], ref["aux_outputs"]):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(a[key], b[key][index], rtol=1e-4, atol=2e-5, msg=f"aux {key}")


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("size,batch", [((224, 224), 2), ((333, 517), 1)])
def test_detector_equals_the_official_design(pre_norm, size, batch):
    official, _, ours, _, postprocessors = official_and_ours(pre_norm)
    official.eval()
    ours.eval()
    images = torch.randn(batch, 3, *size)
    with torch.no_grad():
        expected = official(images)
        got = ours(images)
    assert_outputs_close(got, expected)
    assert expected["pred_logits"].std() > 0.1  # outputs that vary, not saturated constants
    sizes = torch.tensor([[480, 640], [427, 333]])[:batch]
    for mine, want in zip(postprocessors["bbox"](got, sizes), official_postprocess(expected, sizes)):
        torch.testing.assert_close(mine["scores"], want["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(mine["labels"], want["labels"])
        torch.testing.assert_close(mine["boxes"], want["boxes"], rtol=1e-4, atol=1e-2)


def test_padded_batch_equals_the_official_design_on_each_image_alone():
    official, _, ours, _, _ = official_and_ours(False)
    official.eval()
    ours.eval()
    images = [torch.randn(3, 224, 256), torch.randn(3, 160, 192)]
    with torch.no_grad():
        batched = ours(images)  # padded to 224 x 256, with a mask
        for i, img in enumerate(images):
            alone = official(img[None])
            assert_outputs_close({"pred_logits": batched["pred_logits"][i:i + 1],
                                  "pred_boxes": batched["pred_boxes"][i:i + 1],
                                  "aux_outputs": [{k: a[k][i:i + 1] for k in ("pred_logits", "pred_boxes")}
                                                  for a in batched["aux_outputs"]]}, alone)


def test_training_losses_and_gradients_equal_the_official_design():
    official, official_criterion, ours, criterion, _ = official_and_ours(False)
    for module in (official, ours, criterion, official_criterion):
        module.train()
    images = torch.randn(2, 3, 192, 224)
    g = torch.Generator().manual_seed(3)
    targets = []
    for n in (3, 1):
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes], 1)})

    expected = official_criterion(official(images), targets)
    losses = criterion(ours(images), targets)
    assert len(expected) == 13  # 5 for the last layer + 4 per aux layer (2)
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-4, atol=1e-5, msg=key)

    weights = criterion.weight_dict
    assert weights == official_criterion.weight_dict
    assert weights["loss_ce"] == 1 and weights["loss_bbox"] == 5 and weights["loss_giou"] == 2
    sum(expected[k] * weights[k] for k in expected if k in weights).backward()
    sum(losses[k] * weights[k] for k in expected if k in weights).backward()

    ref_grads = {k: p.grad for k, p in official.named_parameters()}
    our_grads = {k: p.grad for k, p in ours.named_parameters()}
    compared = 0
    for name, grad in ref_grads.items():
        if name.startswith("backbone."):
            continue
        ours_name = "input_proj.0." + name.split(".")[-1] if name.startswith("input_proj.") else name
        expected_grad = grad.flatten(1) if name == "input_proj.weight" else grad
        torch.testing.assert_close(our_grads[ours_name], expected_grad, rtol=2e-3, atol=1e-6, msg=name)
        compared += 1
    # Backbone gradients, mapped to our layout as the checkpoint loader maps weights (conv -> linear).
    backbone_grads = pvt_checkpoint_filter({k[len("backbone."):]: v for k, v in ref_grads.items()
                                            if k.startswith("backbone.") and v is not None}, ours.backbone)
    for name, grad in backbone_grads.items():
        if name == "cls_pos_embed":  # the cls entry of pos_embed4: classification only
            continue
        torch.testing.assert_close(our_grads["backbone." + name], grad, rtol=2e-3, atol=1e-6, msg=name)
        compared += 1
    assert compared > 100
