"""DETR model: attention equals torch's, inputs, batch invariance, gradients, no convolutions, DETR checkpoints."""

import argparse
import pickle
from pathlib import Path

import pytest
import torch

import main
from pvt_detr import ModelConfig, build_model, list_backbones, load_detr_checkpoint, load_pvt_checkpoint
from pvt_detr.attention import MultiheadAttention
from pvt_detr.backbone.registry import build_backbone
from pvt_detr.checkpoints import CheckpointError
from pvt_detr.nested_tensor import nested_tensor_from_tensor_list

SMALL = ["--backbone", "pvt_nano", "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
         "--dim_feedforward", "128", "--num_queries", "10", "--num_classes", "5"]


def small_model(*extra):
    return build_model(main.get_args_parser().parse_args(SMALL + list(extra)))


def test_attention_equals_torch_multihead_attention():
    ours = MultiheadAttention(32, 4).eval()
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    expected, _ = ref(q, k, v, key_padding_mask=pad)
    torch.testing.assert_close(ours(q, k, v, pad), expected, rtol=1e-5, atol=1e-5)
    expected_self, _ = ref(q, q, q)
    torch.testing.assert_close(ours(q, q, q), expected_self, rtol=1e-5, atol=1e-5)


def test_default_model_builds_without_data():
    model, criterion, post = build_model(main.get_args_parser().parse_args(["--backbone", "pvt_small"]))
    assert criterion.num_classes == 91 and criterion.eos_coef == 0.1
    assert model.class_embed.out_features == 92 and model.query_embed.num_embeddings == 100
    assert len(model.transformer.encoder.layers) == 6 and len(model.transformer.decoder.layers) == 6
    assert model.backbone.out_indices == (3,) and model.input_proj[0].in_features == 512
    assert criterion.weight_dict["loss_bbox"] == 5 and criterion.weight_dict["loss_giou_4"] == 2
    assert "bbox" in post


def test_input_kinds_give_the_same_outputs():
    model, _, _ = small_model()
    model.eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 64, 96)]
    with torch.no_grad():
        a = model(images)
        b = model(torch.stack(images))
        c = model(nested_tensor_from_tensor_list(images))
    assert a["pred_logits"].shape == (2, 10, 6) and a["pred_boxes"].shape == (2, 10, 4)
    assert len(a["aux_outputs"]) == 1
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
    torch.testing.assert_close(a["pred_logits"], c["pred_logits"])
    assert ((a["pred_boxes"] >= 0) & (a["pred_boxes"] <= 1)).all()


def test_predictions_do_not_depend_on_batch_padding():
    model, _, _ = small_model()
    model.eval()
    small, big = torch.randn(3, 70, 50), torch.randn(3, 150, 190)
    with torch.no_grad():
        alone = model([small])
        batched = model([small, big])
    torch.testing.assert_close(batched["pred_logits"][0], alone["pred_logits"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched["pred_boxes"][0], alone["pred_boxes"][0], rtol=1e-4, atol=1e-4)


def test_every_trainable_parameter_gets_a_gradient():
    model, criterion, _ = small_model("--backbone_stages", "3,4")
    model.train()
    images = [torch.randn(3, 96, 64), torch.randn(3, 64, 80)]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.4], [0.6, 0.5, 0.3, 0.3]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    losses = criterion(model(images), targets)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_0"} <= set(losses)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    no_grad = {n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)}
    # As in DETR: the first decoder layer's content queries are zero, so its self-attention sees zeros (its
    # weights get no gradient; norm1 normalises the still-zero out_proj bias). Everything else must learn.
    first = "transformer.decoder.layers.0."
    assert no_grad <= {first + "self_attn.in_proj_weight", first + "self_attn.out_proj.weight", first + "norm1.weight"}
    assert model.transformer.decoder.layers[0].self_attn.out_proj.bias.grad.abs().sum() > 0


CONV_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


class _OpRecorder:
    """The names of the aten ops run inside the block (forward and backward), read by torch.profiler."""

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.ops = {e.name.removeprefix("aten::") for e in self.prof.events() if e.name.startswith("aten::")}


@pytest.mark.parametrize("name", list_backbones())
def test_no_convolution_modules_or_ops(name):
    backbone = build_backbone(name)
    assert not [m for m in backbone.modules() if isinstance(m, CONV_MODULES)]
    with torch.no_grad(), _OpRecorder() as rec:
        backbone.forward_features(torch.randn(1, 3, 64, 64))
    assert rec.ops and not [op for op in rec.ops if "conv" in op.lower()], rec.ops


@pytest.mark.parametrize("extra", [(), ("--local_layers", "1,1,0,0")])
def test_full_detr_has_no_convolution_and_runs_forward_backward_without_conv_ops(extra):
    model, criterion, _ = small_model(*extra)
    assert not [m for m in model.modules() if isinstance(m, CONV_MODULES)]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with _OpRecorder() as rec:
        losses = criterion(model([torch.randn(3, 64, 64)]), targets)
        sum(losses[k] for k in ("loss_ce", "loss_bbox", "loss_giou")).backward()
    assert "mm" in rec.ops or "addmm" in rec.ops
    assert not [op for op in rec.ops if "conv" in op.lower()], rec.ops


def _detr_format(state_dict):
    """Our state dict rewritten as a facebookresearch/detr checkpoint with a ResNet-50 backbone and 91 classes."""
    sd = {k: v.clone() for k, v in state_dict.items() if not k.startswith(("backbone.", "input_proj."))}
    sd["input_proj.weight"] = torch.randn(64, 2048, 1, 1)
    sd["input_proj.bias"] = torch.randn(64)
    sd["class_embed.weight"] = torch.randn(92, 64)
    sd["class_embed.bias"] = torch.randn(92)
    sd["backbone.0.body.conv1.weight"] = torch.randn(64, 3, 7, 7)
    sd["backbone.0.body.layer1.0.bn1.running_mean"] = torch.randn(64)
    return {"model": sd, "args": {"lr": 1e-4}}


def test_load_detr_checkpoint_round_trip(tmp_path):
    source, _, _ = small_model()
    path = tmp_path / "detr-r50.pth"
    torch.save(_detr_format(source.state_dict()), path)
    target, _, _ = small_model()
    report = load_detr_checkpoint(target, path)
    assert set(report.skipped) == {"input_proj.0.weight", "class_embed.weight", "class_embed.bias"}
    assert sorted(report.unused) == ["backbone.0.body.conv1.weight", "backbone.0.body.layer1.0.bn1.running_mean"]
    for key in ("transformer.decoder.layers.1.multihead_attn.in_proj_weight", "query_embed.weight",
                "bbox_embed.layers.2.weight", "transformer.encoder.layers.0.linear1.bias"):
        torch.testing.assert_close(target.state_dict()[key], source.state_dict()[key])
    assert any(k.startswith("backbone.") for k in report.missing)
    # input_proj bias has a matching shape (64) and loads even though the weight is skipped.
    assert "input_proj.0.bias" in report.loaded

    # A same-architecture checkpoint of ours loads completely.
    torch.save({"model": source.state_dict()}, tmp_path / "ours.pth")
    again, _, _ = small_model()
    report = load_detr_checkpoint(again, tmp_path / "ours.pth")
    assert not report.missing and not report.unused and not report.skipped


def test_detr_training_checkpoint_with_its_args_namespace_loads(tmp_path):
    """facebookresearch/detr's main.py saves {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args': Namespace}."""
    source, _, _ = small_model()
    checkpoint = _detr_format(source.state_dict())
    checkpoint.update(args=argparse.Namespace(lr=1e-4, backbone="resnet50", lr_drop=200, output_dir=""), epoch=499,
                      optimizer={"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]})
    torch.save(checkpoint, tmp_path / "detr-train.pth")
    target, _, _ = small_model()
    report = load_detr_checkpoint(target, tmp_path / "detr-train.pth")
    torch.testing.assert_close(target.state_dict()["query_embed.weight"], source.state_dict()["query_embed.weight"])
    assert "transformer.decoder.norm.weight" in report.loaded


@pytest.mark.parametrize("content", ["text", "tensor", "list", "empty", "random"])
def test_files_that_are_not_state_dicts_are_one_line_errors(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "list":
        torch.save([torch.zeros(3)], path)
    else:
        data = {"text": b"root:x:0:0:root:/root:/bin/bash\n", "empty": b"",
                "random": bytes(range(256)) * 8}[content]
        path.write_bytes(data)
    model, _, _ = small_model()
    for load in (load_detr_checkpoint, lambda m, p: load_pvt_checkpoint(m.backbone, p)):
        with pytest.raises(CheckpointError) as err:
            load(model, path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        expected = "expected a state dict" if content in ("tensor", "list") else "not a readable checkpoint"
        assert expected in message, message


def test_load_detr_checkpoint_architecture_mismatch_is_one_line(tmp_path):
    source, _, _ = small_model("--hidden_dim", "32")
    path = tmp_path / "other.pth"
    torch.save({"model": source.state_dict()}, path)
    target, _, _ = small_model()
    with pytest.raises(CheckpointError) as err:
        load_detr_checkpoint(target, path)
    assert "\n" not in str(err.value) and "different architecture" in str(err.value)


@pytest.mark.parametrize("source_args,target_args,part", [
    (["--dec_layers", "3"], [], "transformer"),  # a decoder layer only in the checkpoint
    ([], ["--enc_layers", "2"], "transformer"),  # an encoder layer only in the model
    ([], ["--pre_norm"], "transformer"),  # the pre-norm encoder's final norm only in the model
    (["--backbone", "pvt_tiny"], [], "backbone"),  # one of our checkpoints with a deeper PVT
])
def test_load_detr_checkpoint_with_other_layer_counts_is_an_error_and_loads_nothing(source_args, target_args, part):
    source, _, _ = small_model(*source_args)
    target, _, _ = small_model(*target_args)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_detr_checkpoint(target, {"model": source.state_dict()})
    message = str(err.value)
    assert "\n" not in message and f"its {part} does not fit this model" in message, message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_pickled_object_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": _Unsafe()}, path)
    model, _, _ = small_model()
    with pytest.raises(CheckpointError, match="refused"):
        load_detr_checkpoint(model, path)


class _Unsafe:
    pass


def test_invalid_config_values_are_clear_errors():
    with pytest.raises(ValueError, match=r"^--backbone_stages must be <= 4, got 5$"):
        ModelConfig(backbone_stages=(5,))
    with pytest.raises(ValueError, match=r"^--hidden_dim 256 must be even and divisible by --nheads 3$"):
        ModelConfig(nheads=3)
    with pytest.raises(ValueError, match=r"^--dropout: expected a number, got 'x'$"):
        ModelConfig.from_any({"dropout": "x"})
    with pytest.raises(ValueError, match=r"^--num_queries: expected an integer, got 2.5$"):
        ModelConfig.from_any({"num_queries": 2.5})
    with pytest.raises(ValueError, match=r"^--eos_coef must be a finite number, got nan$"):
        ModelConfig(eos_coef=float("nan"))
    with pytest.raises(SystemExit):
        main.get_args_parser().parse_args(["--backbone_stages", "5"])


def test_sr_ratios_flag_sets_each_stage_and_rejects_bad_values():
    default, _, _ = small_model()
    model, _, _ = small_model("--sr_ratios", "2,1,1,1")
    ratios = lambda m: [stage[0].attn.sr_ratio for stage in m.backbone.blocks]  # noqa: E731
    assert ratios(default) == [8, 4, 2, 1] and ratios(model) == [2, 1, 1, 1]
    # stage 1 of a 64 px image (16 x 16 tokens) now reads 8 x 8 reduced keys instead of 2 x 2
    assert model.backbone.blocks[0][0].attn.sr.patch_size == 2 and not hasattr(model.backbone.blocks[1][0].attn, "sr")
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(out["pred_boxes"]).all()
    for bad in ((2, 1), (0, 1, 1, 1)):
        with pytest.raises(ValueError, match="--sr_ratios"):
            ModelConfig(sr_ratios=bad)


@pytest.mark.parametrize("err,reason", [
    (pickle.UnpicklingError(), "UnpicklingError"),
    (pickle.UnpicklingError("Weights only load failed. Re-running...\n\nWeightsUnpickler error: Unsupported operand 3"),
     "Unsupported operand 3"),
    (RuntimeError("PytorchStreamReader failed reading zip archive: not a ZIP archive. This is an internal error. "
                  "If you are seeing this error, there is a high likelihood ..."),
     "PytorchStreamReader failed reading zip archive: not a ZIP archive"),
    (KeyError(105), "KeyError: 105"),
    (EOFError(), "EOFError"),
])
def test_every_torch_load_failure_is_worded_in_one_line(err, reason):
    from pvt_detr.checkpoints import _load_error

    message = str(_load_error(Path("w.pth"), err))
    assert message == f"w.pth: not a readable checkpoint (truncated, corrupt or not a torch.save file?): {reason}"


def _detr_learned_position(row_embed, col_embed, h, w):
    """facebookresearch/detr `PositionEmbeddingLearned.forward` for one (h, w) map: (2F, h, w)."""
    x_emb = col_embed[torch.arange(w)]  # (w, F)
    y_emb = row_embed[torch.arange(h)]  # (h, F)
    return torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1).permute(2, 0, 1)


def test_learned_position_embedding_is_detrs_and_trains():
    model, criterion, _ = small_model("--position_embedding", "learned", "--backbone_stages", "3")
    pe = model.position_embedding
    assert pe.row_embed.weight.shape == pe.col_embed.weight.shape == (50, 32)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True  # padding: positions stay absolute
    pos = pe(mask)  # (B, H, W, 2F)
    expected = _detr_learned_position(pe.row_embed.weight, pe.col_embed.weight, 5, 7).permute(1, 2, 0)
    torch.testing.assert_close(pos[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(pos[1], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at most 50 x 50 feature cells, got 51 x 7"):
        pe(torch.zeros(1, 51, 7, dtype=torch.bool))

    model.train()
    images = [torch.randn(3, 96, 64), torch.randn(3, 64, 80)]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.4]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    losses = criterion(model(images), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    # 96 x 64 and 64 x 80 images pad to 96 x 96: 6 x 6 cells at stride 16, of which rows 0-5 and columns 0-4 hold
    # pixels of some image; the all-padding column 5 is masked everywhere and gets no gradient, nor do cells >= 6
    assert pe.row_embed.weight.grad[:6].abs().sum(1).gt(0).all() and pe.row_embed.weight.grad[6:].eq(0).all()
    assert pe.col_embed.weight.grad[:5].abs().sum(1).gt(0).all() and pe.col_embed.weight.grad[5:].eq(0).all()


def test_detr_checkpoint_with_learned_positions_loads_them(tmp_path):
    source, _, _ = small_model("--position_embedding", "v3")
    checkpoint = _detr_format(source.state_dict())
    sd = checkpoint["model"]
    for name in ("row_embed", "col_embed"):  # DETR keeps them in its Joiner: backbone.1.*
        sd[f"backbone.1.{name}.weight"] = sd.pop(f"position_embedding.{name}.weight")
    torch.save(checkpoint, tmp_path / "detr-r50-learned.pth")
    target, _, _ = small_model("--position_embedding", "learned")
    report = load_detr_checkpoint(target, tmp_path / "detr-r50-learned.pth")
    assert {"position_embedding.row_embed.weight", "position_embedding.col_embed.weight"} <= set(report.loaded)
    torch.testing.assert_close(target.position_embedding.row_embed.weight, source.position_embedding.row_embed.weight)
    args = main.get_args_parser().parse_args(SMALL)
    args.position_embedding = "cosine"
    with pytest.raises(ValueError, match="--position_embedding 'cosine' is not one of"):
        build_model(args)


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing the backbone blocks and the encoder's attention in backward (ModelConfig.grad_checkpointing) changes
    what is kept, not what is computed: same loss and gradients, dropout and drop path included."""
    results = []
    for enabled in (True, False):
        torch.manual_seed(0)
        model, criterion, _ = build_model(ModelConfig(
            backbone="pvt_nano", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
            num_classes=5, dropout=0.2, drop_path=0.2, grad_checkpointing=enabled))
        assert model.backbone.blocks[0][0].grad_checkpointing is enabled
        assert model.transformer.encoder.layers[0].self_attn.grad_checkpointing is enabled
        model.train()
        torch.manual_seed(1)
        losses = criterion(model([torch.randn(3, 96, 128), torch.randn(3, 64, 96)]),
                           [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3],
                                                                                   [0.6, 0.4, 0.3, 0.2]])}] * 2)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (loss_on, grads_on), (loss_off, grads_off) = results
    assert torch.equal(loss_on, loss_off) and grads_on.keys() == grads_off.keys() and len(grads_on) > 50
    for key in grads_on:
        torch.testing.assert_close(grads_on[key], grads_off[key], rtol=1e-5, atol=1e-7, msg=key)
