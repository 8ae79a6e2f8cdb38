"""The whole detector against an independent DETR + PVT written from the official formulas (tests/detr_reference.py).

Weights go from the reference into our model only through the public loaders, in the official formats: the
backbone as a PVT ImageNet state dict (`load_pvt_checkpoint`), the rest as a facebookresearch/detr checkpoint
(`load_detr_checkpoint`, with its 1 x 1 conv `input_proj`). Outputs, post-processed detections, losses (with the
logged class and cardinality errors) and gradients must then agree.
"""

import pytest
import torch

import main
from pvt_detr import build_model, load_detr_checkpoint, load_pvt_checkpoint
from pvt_detr.checkpoints import pvt_checkpoint_filter
from tests.detr_reference import RefDETR, ref_postprocess, ref_set_loss
from tests.pvt_reference import RefPVT

NUM_CLASSES, QUERIES = 5, 10
ARGS = ["--backbone", "pvt_tiny", "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "2", "--dec_layers", "3",
        "--dim_feedforward", "128", "--num_queries", str(QUERIES), "--num_classes", str(NUM_CLASSES),
        "--dropout", "0", "--drop_path", "0"]


def reference_and_ours(pre_norm: bool):
    torch.manual_seed(0)
    ref = RefDETR(RefPVT(depths=(2, 2, 2, 2)), 512, NUM_CLASSES, QUERIES, d=64, heads=4, enc_layers=2, dec_layers=3,
                  ffn=128, pre_norm=pre_norm)
    torch.manual_seed(1)  # our own initialisation differs, so nothing passes by sharing it
    ours, criterion, postprocessors = build_model(main.get_args_parser().parse_args(
        ARGS + (["--pre_norm"] if pre_norm else [])))
    backbone_report = load_pvt_checkpoint(ours.backbone, ref.backbone.state_dict())
    assert sorted(backbone_report.unused) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    report = load_detr_checkpoint(ours, ref.detr_checkpoint())
    assert not report.skipped
    assert all(k.startswith("backbone.") for k in report.missing)
    assert all(k.startswith("backbone.0.body.") for k in report.unused)
    return ref, ours, criterion, postprocessors


def assert_outputs_close(ours: dict, ref: dict, index=slice(None)):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(ours[key], ref[key][index], rtol=1e-4, atol=2e-5, msg=key)
    assert len(ours["aux_outputs"]) == len(ref["aux_outputs"]) == 2
    for a, b in zip(ours["aux_outputs"], ref["aux_outputs"]):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(a[key], b[key][index], rtol=1e-4, atol=2e-5, msg=f"aux {key}")


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("size,batch", [((224, 224), 2), ((333, 517), 1)])
def test_detector_equals_the_reference(pre_norm, size, batch):
    ref, ours, _, postprocessors = reference_and_ours(pre_norm)
    ref.eval()
    ours.eval()
    images = torch.randn(batch, 3, *size)
    with torch.no_grad():
        expected = ref(images, torch.zeros(batch, *size, dtype=torch.bool))
        fast = ours(images)  # no autograd: the in-place inference path
    assert_outputs_close(fast, expected)
    assert expected["pred_logits"].std() > 0.1  # outputs that vary, not saturated constants
    with torch.enable_grad():
        assert_outputs_close(ours(images), expected)  # the autograd path
    sizes = torch.tensor([[480, 640], [427, 333]])[:batch]
    for got, want in zip(postprocessors["bbox"](fast, sizes), ref_postprocess(expected, sizes)):
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-2)


def test_padded_batch_equals_the_reference_on_each_image_alone():
    ref, ours, _, _ = reference_and_ours(False)
    ref.eval()
    ours.eval()
    images = [torch.randn(3, 224, 256), torch.randn(3, 160, 192)]
    with torch.no_grad():
        batched = ours(images)  # padded to 224 x 256, with a mask
        for i, img in enumerate(images):
            alone = ref(img[None], torch.zeros(1, *img.shape[1:], dtype=torch.bool))
            assert_outputs_close({"pred_logits": batched["pred_logits"][i:i + 1],
                                  "pred_boxes": batched["pred_boxes"][i:i + 1],
                                  "aux_outputs": [{k: a[k][i:i + 1] for k in ("pred_logits", "pred_boxes")}
                                                  for a in batched["aux_outputs"]]}, alone)


def test_training_losses_and_gradients_equal_the_reference():
    ref, ours, criterion, _ = reference_and_ours(False)
    ref.train()
    ours.train()
    criterion.train()
    images = torch.randn(2, 3, 192, 224)
    g = torch.Generator().manual_seed(3)
    targets = []
    for n in (3, 1):
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes], 1)})

    expected = ref_set_loss(ref(images, torch.zeros(2, 192, 224, dtype=torch.bool)), targets, NUM_CLASSES)
    losses = criterion(ours(images), targets)
    assert len(expected) == 13  # 5 for the last layer + 4 per aux layer (2)
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-4, atol=1e-5, msg=key)

    weights = criterion.weight_dict
    assert weights["loss_ce"] == 1 and weights["loss_bbox"] == 5 and weights["loss_giou"] == 2
    sum(expected[k] * weights[k] for k in expected if k in weights).backward()
    sum(losses[k] * weights[k] for k in expected if k in weights).backward()

    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
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
