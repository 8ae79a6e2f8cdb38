"""MMDetection 2.x PVT-DETR / DETR checkpoints through `load_detr_checkpoint`.

A randomly initialised small pvt-detr model is written out in MMDetection's layout by this file's own converter,
which follows the key table of REFERENCE.md ("MMDetection 2.x checkpoints") and shares no code with the loader.
Loaded back into fresh models, the outputs must equal those of the same weights given in facebookresearch/detr's
(pvt-detr's) layout, and the remapped class probabilities those of the 81-way softmax head.
"""

from collections import OrderedDict

import numpy as np
import pytest
import torch

import main
from pvt_detr import build_model, load_detr_checkpoint
from pvt_detr.checkpoints import CheckpointError
from pvt_detr.label_map import COCO_CATEGORIES, LabelMap

SMALL = ["--backbone", "pvt_nano", "--backbone_stages", "4", "--hidden_dim", "64", "--nheads", "4", "--enc_layers",
         "1", "--dec_layers", "2", "--dim_feedforward", "128", "--num_queries", "10", "--dropout", "0", "--drop_path",
         "0"]
D = 64
COCO_IDS = [i for i, _ in COCO_CATEGORIES]
COCO_NAMES = [n for _, n in COCO_CATEGORIES]


def small_model(num_classes: int = 91, seed: int = 0, *extra: str):
    torch.manual_seed(seed)
    model, _, _ = build_model(main.get_args_parser().parse_args(SMALL + ["--num_classes", str(num_classes), *extra]))
    with torch.no_grad():  # non-trivial values everywhere, so that a tensor left at its initialisation shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def to_mmdet(model, dialect: str, fc_cls: tuple[torch.Tensor, torch.Tensor]) -> OrderedDict:
    """Our state dict in MMDetection 2.x's layout (REFERENCE.md); fc_cls = (weight (C + 1, d), bias (C + 1,))."""
    if dialect == "2.13":
        attn, cross, ffn, post_norm = "attentions.0.attn", "attentions.1.attn", "ffns.0", "post_norm"
    else:
        attn, cross, ffn, post_norm = "self_attn.attn", "multihead_attn.attn", "ffn", "norm"
    backbone = model.backbone
    out = OrderedDict()
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "backbone":
            stage = int(parts[2])
            if parts[1] == "pos_embed":
                if stage == 3:  # [1, 1 + 49, C]: slot 0 belonged to the cls token
                    value = torch.cat([torch.randn(1, 1, value.shape[2]), value], 1)
                out[f"backbone.pos_embed{stage + 1}"] = value
                continue
            if key.endswith("proj.weight") and parts[1] == "patch_embed" or key.endswith("attn.sr.weight"):
                sr_ratio = backbone.blocks[stage][0].attn.sr_ratio
                p = backbone.patch_sizes[stage] if parts[1] == "patch_embed" else sr_ratio
                o, n = value.shape
                value = value.reshape(o, p, p, n // (p * p)).permute(0, 3, 1, 2)  # linear over (p1, p2, c) -> conv
            name = "block" if parts[1] == "blocks" else parts[1]
            out[f"backbone.{name}{stage + 1}." + ".".join(parts[3:])] = value
            continue
        head = {"query_embed.weight": "query_embedding.weight",
                "input_proj.0.weight": "input_proj.weight", "input_proj.0.bias": "input_proj.bias",
                "bbox_embed.layers.0.weight": "reg_ffn.layers.0.0.weight",
                "bbox_embed.layers.0.bias": "reg_ffn.layers.0.0.bias",
                "bbox_embed.layers.1.weight": "reg_ffn.layers.1.weight",
                "bbox_embed.layers.1.bias": "reg_ffn.layers.1.bias",
                "bbox_embed.layers.2.weight": "fc_reg.weight", "bbox_embed.layers.2.bias": "fc_reg.bias",
                "transformer.decoder.norm.weight": f"transformer.decoder.{post_norm}.weight",
                "transformer.decoder.norm.bias": f"transformer.decoder.{post_norm}.bias"}
        if key in head:
            if key == "input_proj.0.weight":
                value = value[:, :, None, None]  # (d, C) -> 1x1 conv (d, C, 1, 1)
            out["bbox_head." + head[key]] = value
        elif key.startswith("transformer."):
            layer, rest = ".".join(parts[:4]), ".".join(parts[4:])
            for ours, theirs in (("self_attn.", attn + "."), ("multihead_attn.", cross + "."),
                                 ("linear1.", ffn + ".layers.0.0."), ("linear2.", ffn + ".layers.1."),
                                 ("norm1.", "norms.0."), ("norm2.", "norms.1."), ("norm3.", "norms.2.")):
                if rest.startswith(ours):
                    out[f"bbox_head.{layer}.{theirs}{rest[len(ours):]}"] = value
                    break
            else:
                raise AssertionError(f"no MMDetection name for {key}")
        elif not key.startswith("class_embed."):
            raise AssertionError(f"no MMDetection name for {key}")
    out["bbox_head.fc_cls.weight"], out["bbox_head.fc_cls.bias"] = fc_cls
    return out


def detr_layout_head(fc_cls, rows: list[int], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact remap written out: our row rows[i] <- row i, no-object <- the last row, others 0 / -1e4."""
    weight, bias = fc_cls
    new_weight, new_bias = torch.zeros(num_classes + 1, weight.shape[1]), torch.full((num_classes + 1,), -1e4)
    for i, r in enumerate(rows + [num_classes]):
        new_weight[r], new_bias[r] = weight[i], bias[i]
    return new_weight, new_bias


def random_fc_cls(num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(num_rows, D, generator=g) * 0.5, torch.randn(num_rows, generator=g)


def container(state_dict, classes=tuple(COCO_NAMES), **meta) -> dict:
    return {"meta": {"mmdet_version": "2.13.0", "CLASSES": classes, "epoch": 50, "config": "model = dict(...)",
                     **meta},
            "state_dict": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 1e-4, "params": [0, 1]}]}}


IMAGES = [torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(1)),
          torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(2))]  # a padded batch


def run(model) -> tuple[dict, torch.Tensor]:
    """Outputs on the padded batch and the class head's input (B, Q, d)."""
    seen = []
    handle = model.class_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = model(IMAGES)
    handle.remove()
    return out, seen[-1][-1] if seen[-1].dim() == 4 else seen[-1]


def assert_same_outputs(a: dict, b: dict):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    for x, y in zip(a["aux_outputs"], b["aux_outputs"]):
        torch.testing.assert_close(x["pred_logits"], y["pred_logits"], rtol=1e-5, atol=1e-5)


def assert_probabilities_equal(out: dict, hs: torch.Tensor, fc_cls, rows: list[int]):
    """softmax over our rows == the checkpoint's own softmax over its C + 1 rows; every other row has 0."""
    weight, bias = fc_cls
    expected = torch.softmax(hs @ weight.T + bias, -1)  # (B, Q, C + 1)
    prob = torch.softmax(out["pred_logits"], -1)  # (B, Q, K + 1)
    K = prob.shape[-1] - 1
    torch.testing.assert_close(prob[..., rows + [K]], expected, rtol=0, atol=1e-6)
    others = torch.ones(K + 1, dtype=torch.bool)
    others[rows + [K]] = False
    assert prob[..., others].max() < 1e-6


@pytest.mark.parametrize("dialect", ["2.13", "2.8"])
def test_mmdet_pvt_detr_container_loads_every_key_with_the_outputs_of_the_detr_layout(tmp_path, dialect):
    source = small_model()
    fc_cls = random_fc_cls(81)
    sd = to_mmdet(source, dialect, fc_cls)
    path = tmp_path / "detr_pvt_s_8x2_50ep_coco.pth"
    torch.save(container(sd), path)

    mmdet = small_model(seed=1)
    report = load_detr_checkpoint(mmdet, path)
    assert report.format.startswith(f"MMDetection 2.x DETR, mmdet {dialect} key names") and "PVT backbone" in \
        report.format
    assert not report.unused and not report.missing and not report.skipped and not report.notes
    assert set(report.renamed.values()) == set(sd)  # every checkpoint key used
    assert len(report.loaded) == len(sd) == len(mmdet.state_dict())
    stage_convs = 4 + sum(1 for stage in source.backbone.blocks for blk in stage if hasattr(blk.attn, "sr"))
    how = {}
    for key, text in report.converted.items():
        how.setdefault(text, []).append(key)
    assert sorted(len(v) for v in how.values()) == [1, 1, 2, stage_convs]
    assert report.converted["backbone.pos_embed.3"] == "pos_embed4 without its unused first (cls) slot"
    assert report.converted["input_proj.0.weight"] == "1x1 conv -> linear"
    assert str(report).splitlines()[0] == f"format: {report.format}"

    rows = COCO_IDS  # our row of each mmdet row: its COCO category id
    detr = small_model(seed=2)
    detr_sd = dict(source.state_dict())  # facebookresearch/detr's names (the PVT backbone under ours)
    detr_sd["input_proj.weight"] = detr_sd.pop("input_proj.0.weight")[:, :, None, None]  # its 1x1 conv
    detr_sd["input_proj.bias"] = detr_sd.pop("input_proj.0.bias")
    detr_sd["class_embed.weight"], detr_sd["class_embed.bias"] = detr_layout_head(fc_cls, rows, 91)
    detr_report = load_detr_checkpoint(detr, {"model": detr_sd})
    assert detr_report.format.startswith("facebookresearch/detr") and not detr_report.missing

    got, hs = run(mmdet)
    expected, _ = run(detr)
    assert_same_outputs(got, expected)
    torch.testing.assert_close(got["pred_boxes"], run(source)[0]["pred_boxes"], rtol=1e-5, atol=1e-5)
    assert_probabilities_equal(got, hs, fc_cls, rows)


def test_meta_class_order_decides_the_remap_and_a_bare_state_dict_loads_as_coco():
    source = small_model()
    fc_cls = random_fc_cls(81)
    sd = to_mmdet(source, "2.13", fc_cls)
    order = list(range(80))[::-1]  # a checkpoint whose CLASSES list COCO's names backwards
    model = small_model(seed=1)
    report = load_detr_checkpoint(model, container(sd, classes=tuple(COCO_NAMES[i] for i in order)))
    got, hs = run(model)
    assert_probabilities_equal(got, hs, fc_cls, [COCO_IDS[i] for i in order])
    assert "meta['CLASSES']" in report.converted["class_embed.weight"]

    bare = small_model(seed=1)  # no meta: an 81-way head is read as COCO's 80 in file order
    report = load_detr_checkpoint(bare, sd)
    got, hs = run(bare)
    assert_probabilities_equal(got, hs, fc_cls, COCO_IDS)
    assert "COCO's 80 classes" in report.converted["class_embed.weight"]


def test_remap_into_a_model_with_custom_category_ids():
    classes = ("dog", "bird", "cat")  # an mmdet model of a 3-class dataset, its file order
    label_map = LabelMap.from_coco_categories([{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"},
                                               {"id": 9, "name": "bird"}])  # ours: DETR layout, 10 rows
    source = small_model(10)
    fc_cls = random_fc_cls(4)
    sd = to_mmdet(source, "2.8", fc_cls)
    model = small_model(10, 1)
    report = load_detr_checkpoint(model, container(sd, classes=classes), label_map=label_map)
    assert not report.missing and not report.unused
    got, hs = run(model)
    assert_probabilities_equal(got, hs, fc_cls, [2, 9, 5])
    torch.testing.assert_close(model.class_embed.bias[[0, 1, 3, 4, 6, 7, 8]], torch.full((7,), -1e4))

    compact = LabelMap(((9, "bird"), (5, "cat"), (2, "dog"), (4, "fish")))  # a compact map with a class more
    model = small_model(4, 1)
    load_detr_checkpoint(model, container(sd, classes=classes), label_map=compact)
    got, hs = run(model)
    assert_probabilities_equal(got, hs, fc_cls, [2, 0, 1])

    other = LabelMap(((1, "cat"), (2, "horse")))  # fine-tuning on other classes: the class head starts afresh
    model = small_model(2, 1)
    before = model.class_embed.weight.clone()
    report = load_detr_checkpoint(model, container(sd, classes=classes), label_map=other)
    assert torch.equal(model.class_embed.weight, before)
    assert report.notes == ["class_embed not loaded: 2 of the checkpoint's 3 classes (meta['CLASSES']) are not in "
                            "the label map, e.g. 'dog'"]
    assert report.missing == ["class_embed.bias", "class_embed.weight"]


def test_keep_label_map_loads_the_81_way_head_as_it_is():
    source = small_model()
    fc_cls = random_fc_cls(81)
    sd = to_mmdet(source, "2.13", fc_cls)
    model = small_model(80, 1)
    report = load_detr_checkpoint(model, container(sd), keep_label_map=True)
    assert report.label_map == LabelMap(COCO_CATEGORIES) and report.label_map.num_classes == 80
    assert report.label_map.layout == "compact" and report.label_map.category_ids[:12] == COCO_IDS[:12]
    assert torch.equal(model.class_embed.weight, fc_cls[0]) and torch.equal(model.class_embed.bias, fc_cls[1])
    assert not report.missing and not report.skipped and "class_embed.weight" not in report.converted

    bigger = small_model(91, 1)  # no room for it as is: skipped, the label map says how to build the model
    report = load_detr_checkpoint(bigger, container(sd), keep_label_map=True)
    assert set(report.skipped) == {"class_embed.weight", "class_embed.bias"}
    assert report.label_map.num_classes == 80


def test_a_model_without_room_for_the_coco_ids_is_a_one_line_error():
    sd = to_mmdet(small_model(), "2.13", random_fc_cls(81))
    model = small_model(80, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_detr_checkpoint(model, container(sd))
    message = str(err.value)
    assert "\n" not in message and "no room for COCO category id 90" in message and "keep_label_map=True" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mmdet_detr_r50_loads_its_transformer_and_reports_the_resnet_unused():
    source = small_model()
    sd = OrderedDict((k, v) for k, v in to_mmdet(source, "2.13", random_fc_cls(81)).items()
                     if not k.startswith("backbone."))
    sd["backbone.conv1.weight"] = torch.randn(64, 3, 7, 7)
    sd["backbone.layer1.0.bn1.running_mean"] = torch.randn(64)
    sd["bbox_head.input_proj.weight"] = torch.randn(D, 2048, 1, 1)
    model = small_model(seed=1)
    report = load_detr_checkpoint(model, container(sd))
    assert report.format.endswith("backbone not loaded (not a PVT)")
    assert report.unused == ["backbone.conv1.weight", "backbone.layer1.0.bn1.running_mean"]
    assert set(report.skipped) == {"input_proj.0.weight"}
    assert all(k.startswith("backbone.") for k in report.missing)
    torch.testing.assert_close(model.transformer.decoder.layers[1].multihead_attn.in_proj_weight,
                               source.transformer.decoder.layers[1].multihead_attn.in_proj_weight)


@pytest.mark.parametrize("keys,expected", [
    (["backbone.layers.0.0.projection.weight", "bbox_head.retina_cls.weight"],
     "MMDetection >= 2.17 checkpoint with converted PVT names (backbone.layers.*)"),
    (["encoder.layers.0.self_attn.attn.in_proj_weight", "decoder.layers.0.norms.0.weight",
      "neck.convs.0.conv.weight", "bbox_head.fc_cls.weight"], "MMDetection 3.x checkpoint"),
], ids=["converted_pvt", "mmdet3"])
def test_formats_we_do_not_read_are_one_line_errors_naming_them(tmp_path, keys, expected):
    path = tmp_path / "other.pth"
    torch.save(container(OrderedDict((k, torch.zeros(2)) for k in keys)), path)
    with pytest.raises(CheckpointError) as err:
        load_detr_checkpoint(small_model(), path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and expected in message, message


RAN = []


def _record(*args):
    RAN.append(args)
    return "ran"


class FakeConfig:
    """What an mmcv Config holds (text, a dict); unpickling it normally would call `_record`."""

    def __init__(self, text):
        self.text, self.cfg = text, {"lr": 1e-4}

    def __reduce__(self):
        return _record, (self.text,)


class FakeRecord:
    def __init__(self):
        self.best_score = np.float64(0.5)


def test_meta_with_objects_weights_only_refuses_is_left_out_and_the_state_dict_loads(tmp_path):
    source = small_model()
    fc_cls = random_fc_cls(81)
    sd = to_mmdet(source, "2.13", fc_cls)
    path = tmp_path / "with_config.pth"
    torch.save(container(sd, config=FakeConfig("model = dict()"), hook_msgs=FakeRecord(), score=np.float64(0.3)),
               path)
    RAN.clear()
    model = small_model(seed=1)
    report = load_detr_checkpoint(model, path)
    assert RAN == []  # the stand-ins ran nothing from the file
    assert len(report.notes) == 1 and report.notes[0].startswith(f"{path}: its meta holds objects that weights_only "
                                                                 "refuses (")
    for name in ("_record", "FakeRecord", "numpy"):
        assert name in report.notes[0]
    assert report.notes[0].endswith("they were not loaded, the state dict was")
    assert str(report).splitlines()[1] == report.notes[0]
    got, hs = run(model)
    assert_probabilities_equal(got, hs, fc_cls, COCO_IDS)  # meta's plain CLASSES still name the rows
    torch.testing.assert_close(got["pred_boxes"], run(source)[0]["pred_boxes"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["state_dict", "top_level", "not_a_container"])
def test_refused_objects_outside_meta_are_still_refused(tmp_path, where):
    sd = to_mmdet(small_model(), "2.13", random_fc_cls(81))
    checkpoint = container(sd)
    if where == "state_dict":
        checkpoint["state_dict"]["bbox_head.extra"] = FakeRecord()
    elif where == "top_level":
        checkpoint["extra"] = FakeRecord()
    else:
        checkpoint = {"model": sd, "meta": {"config": FakeConfig("x")}}
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    RAN.clear()
    with pytest.raises(CheckpointError, match="refused") as err:
        load_detr_checkpoint(small_model(), path)
    assert "\n" not in str(err.value) and RAN == []


@pytest.mark.slow
def test_main_finetunes_from_an_mmdetection_file_with_the_class_head_matched_by_name(tmp_path, capsys):
    """main.py --finetune on an MMDetection 2.x container whose two classes are named in meta: the report names the
    format, and the dataset's rows (its own ids) get the checkpoint's rows of the same names."""
    from tests.test_label_map_training import _write_dataset
    from training.config import parse_args

    source = small_model(num_classes=2)
    fc_cls = random_fc_cls(3)  # cat, dog, background
    path = tmp_path / "mmdet.pth"
    torch.save(container(to_mmdet(source, "2.13", fc_cls), classes=("cat", "dog")), path)
    _write_dataset(tmp_path / "data", [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}])
    args = parse_args(main.build_cli_parser(), [*SMALL, "--dataset_file", "coco", "--coco_path", str(tmp_path / "data"),
                                                "--finetune", str(path), "--eval", "--device", "cpu",
                                                "--num_workers", "0", "--no_progress", "--test_size", "64",
                                                "--max_size", "96"])
    from training import run as run_module

    built = {}
    original = run_module.build_parts

    def keep_parts(*a, **k):
        built["parts"] = original(*a, **k)
        return built["parts"]

    run_module.build_parts = keep_parts
    try:
        main.main(args)
    finally:
        run_module.build_parts = original
    out = capsys.readouterr().out
    assert "MMDetection 2.x DETR, mmdet 2.13 key names" in out
    head = built["parts"].module.class_embed
    weight, bias = fc_cls
    torch.testing.assert_close(head.weight[7], weight[0])  # cat: mmdet row 0 -> category id 7
    torch.testing.assert_close(head.weight[3], weight[1])  # dog: mmdet row 1 -> category id 3
    torch.testing.assert_close(head.bias[-1], bias[2])  # background -> no-object
    assert float(head.bias[0].detach()) == -1e4 and float(head.bias[5].detach()) == -1e4  # ids that are no category
