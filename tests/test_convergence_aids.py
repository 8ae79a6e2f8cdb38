"""Opt-in convergence aids (anchor queries, sigmoid focal loss, Group DETR): shapes, defaults, loss values."""

import torch
from torchvision.ops import sigmoid_focal_loss

import main
from pvt_detr import build_model
from pvt_detr.criterion import GroupSetCriterion, SetCriterion, SigmoidFocalSetCriterion
from pvt_detr.detr import SigmoidPostProcess
from pvt_detr.postprocess import PostProcess

SMALL = ["--backbone", "pvt_nano", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2",
         "--dim_feedforward", "64", "--num_queries", "5", "--num_classes", "8", "--backbone_stages", "3"]


def build(*extra):
    return build_model(main.get_args_parser().parse_args(SMALL + list(extra)))


def targets():
    return [{"labels": torch.tensor([1, 7]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
            {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]])}]


def test_defaults_are_plain_detr():
    args = main.get_args_parser().parse_args([])
    assert not args.anchor_queries and not args.focal_loss and args.num_groups == 1 and args.cls_loss_coef == 1.0
    model, criterion, post = build()
    assert type(criterion) is SetCriterion and type(post["bbox"]) is PostProcess
    assert hasattr(model, "query_embed") and not hasattr(model, "refpoint_embed")
    assert model.class_embed.out_features == 9


def test_anchor_queries_start_at_their_reference_boxes():
    model, _, _ = build("--anchor_queries", "--anchor_size", "0.3")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    ref = model.refpoint_embed.weight.sigmoid()  # (Q, 4)
    torch.testing.assert_close(out["pred_boxes"], ref.expand(2, -1, -1))
    torch.testing.assert_close(ref[:, 2:], torch.full((5, 2), 0.3))


def test_focal_groups_train_and_evaluate():
    model, criterion, post = build("--anchor_queries", "--focal_loss", "--num_groups", "3", "--cls_loss_coef", "2")
    assert isinstance(criterion, GroupSetCriterion) and isinstance(criterion.criterion, SigmoidFocalSetCriterion)
    assert isinstance(post["bbox"], SigmoidPostProcess) and criterion.weight_dict["loss_ce_0"] == 2
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    assert out["pred_logits"].shape == (2, 15, 8) and out["aux_outputs"][0]["pred_boxes"].shape == (2, 15, 4)
    losses = criterion(out, targets())
    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    loss.backward()
    assert model.refpoint_embed.weight.grad is not None and torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, 5, 8)
    (det, _) = post["bbox"](out, torch.tensor([[64, 64], [64, 64]]))
    assert det["boxes"].shape == (40, 4) and det["scores"].shape == det["labels"].shape == (40,)
    assert (det["scores"][:-1] >= det["scores"][1:]).all() and det["labels"].max() < 8


def test_group_criterion_averages_independent_groups():
    _, criterion, _ = build("--num_groups", "2", "--no_aux_loss")
    inner = criterion.criterion
    a = {"pred_logits": torch.randn(2, 5, 9), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}
    b = {"pred_logits": torch.randn(2, 5, 9), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}
    both = {k: torch.cat([a[k], b[k]], 1) for k in a}
    got = criterion(both, targets())
    la, lb = inner(a, targets()), inner(b, targets())
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(got[k], (la[k] + lb[k]) / 2)
    torch.testing.assert_close(criterion(a, targets())["loss_ce"], la["loss_ce"])  # evaluation: one group


def test_focal_loss_value():
    _, criterion, _ = build("--focal_loss", "--no_aux_loss")
    logits, boxes = torch.randn(2, 5, 8), torch.rand(2, 5, 4) * 0.5 + 0.25
    indices = [(torch.tensor([0, 3]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    losses = criterion._losses({"pred_logits": logits, "pred_boxes": boxes}, targets(), indices, 3.0, log=True)
    onehot = torch.zeros(2, 5, 8)
    onehot[0, 0, 7] = onehot[0, 3, 1] = onehot[1, 2, 3] = 1
    torch.testing.assert_close(losses["loss_ce"], sigmoid_focal_loss(logits, onehot, reduction="sum") / 3)


def test_denoising_queries_reconstruct_their_own_targets():
    model, criterion, _ = build("--anchor_queries", "--focal_loss", "--dn_groups", "3", "--dn_box_noise", "0",
                                "--dn_label_noise", "0")
    images = torch.randn(2, 3, 64, 64)
    out = model(images, targets())
    dn = out["dn_outputs"]
    assert dn["pred_boxes"].shape == (2, 6, 4) and len(dn["aux_outputs"]) == 1  # K=3 copies of T=2 boxes
    assert [q.tolist() for q, _ in dn["indices"]] == [[0, 1, 2, 3, 4, 5], [0, 2, 4]]
    assert [t.tolist() for _, t in dn["indices"]] == [[0, 1, 0, 1, 0, 1], [0, 0, 0]]
    # zero-initialised box head, no noise: each denoising query starts exactly at its ground-truth box
    torch.testing.assert_close(dn["pred_boxes"][0, :2], targets()[0]["boxes"], atol=1e-4, rtol=0)
    losses = criterion(out, targets())
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0"} <= set(losses)
    assert criterion.weight_dict["loss_giou_dn_0"] == 2 and losses["loss_bbox_dn"] < 1e-3
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    assert model.label_enc.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert "dn_outputs" not in model(images, targets())  # training only


def test_two_stage_queries_start_at_the_best_tokens():
    model, criterion, _ = build("--anchor_queries", "--focal_loss", "--two_stage", "--dn_groups", "2",
                                "--anchor_size", "0.2")
    assert not hasattr(model, "refpoint_embed")
    images = torch.randn(2, 3, 64, 64)
    out = model(images, targets())
    enc = out["enc_outputs"]
    assert enc["pred_logits"].shape == (2, 16, 8) and enc["pred_boxes"].shape == (2, 16, 4)  # 4 x 4 tokens
    # zero-initialised box heads: token boxes are centred on their tokens, decoder boxes on the chosen tokens
    torch.testing.assert_close(enc["pred_boxes"][0, 5], torch.tensor([0.375, 0.375, 0.2, 0.2]))
    chosen = out["pred_boxes"][..., :2].detach()  # (2, 5, 2) centres
    assert torch.isin((chosen * 4 - 0.5).round().flatten(), torch.arange(4.0)).all()
    losses = criterion(out, targets())
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "loss_ce_dn", "loss_ce_0"} <= set(losses)
    assert criterion.weight_dict["loss_bbox_enc"] == 5
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    assert model.enc_bbox_embed.layers[-1].weight.grad is not None
    # padded images: padding tokens are never chosen and never matched
    model.eval()
    with torch.no_grad():
        out = model([torch.randn(3, 64, 64), torch.randn(3, 32, 64)])
    assert (out["enc_outputs"]["pred_boxes"][1, 8:, 0] == -10).all()
