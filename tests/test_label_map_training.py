"""The label map through training: sparse and 0-based category ids train and score exactly as pycocotools scores
the written detections; --finetune keeps, moves by name or drops a class head by comparing label maps; per-class
AP reaches the log, a file and the console; --evaluator faster prints the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main
from datasets.coco import coco_from_dict
from datasets.coco_eval import evaluate_results_file
from pvt_detr.checkpoints import fit_class_heads
from pvt_detr.label_map import LabelMap
from tests.test_main_cli import TINY
from training.config import parse_args


def _write_dataset(root: Path, categories: list[dict], seed: int = 0) -> None:
    """4 training and 3 validation 64 px images with one or two boxes each, of the given categories."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    ids = [c["id"] for c in categories]
    for split, count in (("train", 8), ("val", 4)):
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            pixels = (torch.rand(64, 64, 3, generator=g) * 60 + 40).to(torch.uint8)
            x, y = (int(v) for v in torch.randint(4, 28, (2,), generator=g))
            pixels[y : y + 24, x : x + 28] = torch.tensor([220, 40, 40], dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"{split}2017" / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
            annotations.append({"id": i + 1, "image_id": i, "category_id": ids[i % len(ids)],
                                "bbox": [x, y, 28, 24], "area": 672.0, "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def _main(capsys, *argv) -> tuple[int | None, str, str]:
    code = None
    try:
        main.main(parse_args(main.build_cli_parser(), [*TINY, "--dataset_file", "coco", "--batch_size", "2",
                                                       *map(str, argv)]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """One epoch on a dataset with 0-based, sparse category ids {0: cat, 5: dog, 300: fox}."""
    base = tmp_path_factory.mktemp("sparse")
    _write_dataset(base / "data", [{"id": 0, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 300, "name": "fox"}])
    code = None
    try:
        main.main(parse_args(main.build_cli_parser(), [*TINY, "--dataset_file", "coco", "--batch_size", "2",
                                                       "--coco_path", str(base / "data"), "--epochs", "1",
                                                       "--output_dir", str(base / "run")]))
    except SystemExit as e:
        code = e.code
    assert code is None
    return base


def test_sparse_zero_based_ids_train_and_score_as_pycocotools_scores_the_written_detections(sparse_run):
    out = sparse_run / "run"
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    label_map = LabelMap.from_list(state["label_map"])
    assert label_map.num_classes == 301 and label_map.names == {0: "cat", 5: "dog", 300: "fox"}
    entry = json.loads((out / "log.txt").read_text().splitlines()[-1])
    results = json.loads((out / "results_val.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(range(301))
    gt = json.loads((sparse_run / "data" / "annotations" / "instances_val2017.json").read_text())
    stats = evaluate_results_file(coco_from_dict(gt), out / "results_val.json")  # pycocotools, from the files
    assert entry["test_coco_eval_bbox"] == pytest.approx(stats, abs=1e-12)
    per_class = {row["category_id"]: row for row in entry["test_per_class_ap"]}
    assert set(per_class) == {0, 5, 300} and [per_class[i]["num_gt"] for i in (0, 5, 300)] == [2, 1, 1]
    mean = sum(r["ap"] for r in per_class.values() if r["ap"] is not None) / 3
    assert mean == pytest.approx(stats[0], abs=1e-9)
    table = (out / "per_class_ap.txt").read_text()
    assert "per-class box AP" in table and "pycocotools" in table and " fox " in table


def test_the_faster_evaluator_prints_the_same_numbers(sparse_run, tmp_path, capsys):
    out = sparse_run / "run"
    code, stdout, _ = _main(capsys, "--coco_path", sparse_run / "data", "--eval", "--resume", out / "checkpoint.pth",
                            "--evaluator", "faster", "--output_dir", tmp_path)
    assert code is None and "evaluator: faster-coco-eval" in stdout and "per-class box AP" in stdout
    faster = json.loads((tmp_path / "final_stats.json").read_text())["coco_eval_bbox"]
    reference = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_coco_eval_bbox"]
    assert faster == pytest.approx(reference, abs=1e-12)


def test_finetune_keeps_moves_or_drops_the_class_head_by_label_map(sparse_run, tmp_path, capsys):
    checkpoint = sparse_run / "run" / "checkpoint.pth"
    trained = torch.load(checkpoint, weights_only=True)["model"]

    # The same names under other ids: the rows move by name.
    _write_dataset(tmp_path / "moved", [{"id": 1, "name": "dog"}, {"id": 2, "name": "fox"}, {"id": 3, "name": "cat"}])
    code, stdout, _ = _main(capsys, "--coco_path", tmp_path / "moved", "--finetune", checkpoint, "--epochs", "1",
                            "--output_dir", tmp_path / "a", "--lr", "1e-12", "--lr_backbone", "0")
    assert code is None and "class head rows moved by category name: same names under other ids" in stdout
    # A different set: the class head starts afresh, with what differs.
    _write_dataset(tmp_path / "other", [{"id": 1, "name": "owl"}, {"id": 2, "name": "cat"}])
    code, stdout, _ = _main(capsys, "--coco_path", tmp_path / "other", "--finetune", checkpoint, "--epochs", "1",
                            "--output_dir", tmp_path / "b")
    line = next(line for line in stdout.splitlines() if "class head not loaded" in line)
    assert code is None and "a different set" in line and "only in the other (e.g. (1, 'owl'))" in line
    moved = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["model"]["class_embed.weight"]
    for new_row, old_row in ((1, 5), (2, 300), (3, 0)):  # dog, fox, cat (an lr of 1e-12 changes nothing visible)
        torch.testing.assert_close(moved[new_row], trained["class_embed.weight"][old_row], rtol=0, atol=1e-8)


def test_fit_class_heads_keeps_moves_and_drops_exactly():
    source = LabelMap(((0, None), (1, "cat"), (2, "dog")))
    weight, bias = torch.arange(8.0).view(4, 2), torch.tensor([0.1, 0.2, 0.3, 0.4])  # 3 rows + no-object
    sd = {"class_embed.weight": weight, "class_embed.bias": bias, "other": torch.ones(1)}
    kept, note = fit_class_heads(sd, source, source, "ckpt")
    assert kept is sd and note.startswith("class head kept")
    moved, note = fit_class_heads(sd, source, LabelMap(((0, None), (1, "dog"), (2, None), (3, "cat"))), "ckpt")
    assert note.startswith("class head rows moved by category name: same names under other ids")
    torch.testing.assert_close(moved["class_embed.weight"], torch.tensor([[0.0, 0], [4, 5], [0, 0], [2, 3], [6, 7]]))
    torch.testing.assert_close(moved["class_embed.bias"], torch.tensor([-1e4, 0.3, -1e4, 0.2, 0.4]))
    assert sd["class_embed.weight"] is weight  # the input is not changed
    dropped, note = fit_class_heads(sd, source, LabelMap(((0, None), (1, "cat"), (2, "owl"))), "ckpt")
    assert "class_embed.weight" not in dropped and "other" in dropped
    assert note.startswith("class head not loaded (it starts afresh): ckpt's categories differ from the dataset's: "
                           "a different set")
