"""Nothing lost, nothing silent: user files are never overwritten or mixed, bad data and declared sizes are one-line
errors or warnings (never memory blow-ups), divergence is the documented non-finite stop, and a run without a
terminal says how it goes. Real files, real processes, the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from datasets import generate_demo_dataset
from pvt_detr import predict
from pvt_detr.checkpoints import CheckpointError
from pvt_detr.inference import Detector
from tests.test_main_cli import TINY
from tests.tiny_detector import ROOT, tiny_checkpoint
from training.config import parse_args


def _main(capsys, *argv) -> tuple[int | None, str, str]:
    """main.main in this process with the TINY flags -> (exit code or None, stdout, stderr)."""
    code = None
    try:
        main.main(parse_args(main.build_cli_parser(), [*TINY, *map(str, argv)]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("failures") / "data"
    generate_demo_dataset(path, 12, 6, 64)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def _copy_images(data: Path, folder: Path, count: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder)) for p in sorted((data / "val2017").glob("*.jpg"))[:count]]


# ---------------------------------------------------------------------------------------------------------------
# No user file is overwritten or mixed


@pytest.mark.slow
def test_predict_never_writes_over_its_inputs_or_an_earlier_run(trained, tmp_path, capsys):
    checkpoint, data = trained
    images = _copy_images(data, tmp_path / "photos")
    before = {p: p.read_bytes() for p in images}
    for out in (tmp_path / "photos", images[0]):
        assert predict.main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "photos")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out}") and "input" in err[0], err
    assert {p: p.read_bytes() for p in images} == before and sorted((tmp_path / "photos").iterdir()) == images

    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(checkpoint), "--out", str(out), *map(str, images)]) == 0
    first = (out / "predictions.json").read_text()
    (out / "predictions.json").write_text("my notes")
    assert predict.main(["--checkpoint", str(checkpoint), "--out", str(out), *map(str, images)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --out {out} already holds predictions.json and 2 more of this run's outputs: pass "
                       "--overwrite to replace them, or choose another output folder")
    assert (out / "predictions.json").read_text() == "my notes"
    assert predict.main(["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite", *map(str, images)]) == 0
    assert (out / "predictions.json").read_text() == first


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only file system is mounted as root")
def test_predict_into_a_read_only_folder_is_one_line(trained, tmp_path, capsys):
    checkpoint, data = trained
    images = _copy_images(data, tmp_path / "photos", 1)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], check=True)
    try:
        assert predict.main(["--checkpoint", str(checkpoint), "--out", str(readonly), str(images[0])]) == 1
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {readonly}: cannot write there (Read-only file system)"]


def test_a_second_run_into_the_same_output_dir_needs_resume_or_overwrite(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = _main(capsys, "--coco_path", demo_data, "--output_dir", out, "--epochs", "1")
    assert code is None
    log = (out / "log.txt").read_text()
    checkpoint = (out / "checkpoint.pth").read_bytes()
    code, stdout, err = _main(capsys, "--coco_path", demo_data, "--output_dir", out, "--epochs", "1")
    assert code == 1 and err.strip().splitlines() == [
        f"error: --output_dir {out} already holds a run (checkpoint.pth, log.txt): pass --resume auto to continue it, "
        "or --overwrite to start over"]
    assert (out / "log.txt").read_text() == log and (out / "checkpoint.pth").read_bytes() == checkpoint
    code, stdout, _ = _main(capsys, "--coco_path", demo_data, "--output_dir", out, "--epochs", "1", "--overwrite")
    assert code is None
    replaced = [line for line in stdout.splitlines() if line.startswith("--overwrite: replacing the run in")]
    assert replaced and all(name in replaced[0] for name in ("checkpoint.pth", "log.txt", "config.yaml"))
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]


def test_resume_auto_without_a_checkpoint_says_it_starts_anew_and_eval_needs_weights(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _main(capsys, "--coco_path", demo_data, "--output_dir", out, "--epochs", "1",
                            "--resume", "auto")
    assert code is None and f"--resume auto: no checkpoint.pth in {out}: starting a new run" in stdout
    for argv in (["--output_dir", tmp_path / "empty", "--resume", "auto"], []):
        code, _, err = _main(capsys, "--coco_path", demo_data, "--eval", *argv)
        assert code == 1 and err.strip().splitlines()[-1].startswith("error: --eval needs weights to evaluate")


def test_a_file_named_like_an_output_folder_and_a_tilde_path(demo_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("a file")
    code, _, err = _main(capsys, "--coco_path", demo_data, "--output_dir", out, "--epochs", "1")
    assert code == 1 and err.strip().splitlines() == [
        f"error: --output_dir {out}: {out / 'tensorboard'} is a file, but the run writes a folder of that name: "
        "move it away"]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = parse_args(main.build_cli_parser(), [*TINY, "--coco_path", str(demo_data), "--output_dir=~/runs/x"])
    assert args.output_dir == str(tmp_path / "home" / "runs" / "x") and not Path("~").exists()


# ---------------------------------------------------------------------------------------------------------------
# Data: categories, empty splits, declared sizes


def _write_split(root: Path, split: str, categories: list[dict], annotations: list[dict], size: int = 64,
                 declared: int | None = None) -> None:
    from PIL import Image

    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(4):
        Image.new("RGB", (size, size), (40 * i, 90, 160)).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": declared or size, "height": declared or size})
    (root / "annotations").mkdir(exist_ok=True)
    anns = [{"id": j + 1, "image_id": j % 4, "area": 100.0, "iscrowd": 0, **a} for j, a in enumerate(annotations)]
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))


def _boxes(category_ids: list[int], **extra) -> list[dict]:
    return [{"category_id": c, "bbox": [8.0 + 4 * i, 8.0, 20.0, 24.0], **extra} for i, c in enumerate(category_ids)]


def test_train_and_val_categories_that_differ_are_reported_and_merged(tmp_path, capsys):
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    _write_split(tmp_path, "train", cats + [{"id": 4, "name": "bird"}], _boxes([1, 2, 4, 1]))
    _write_split(tmp_path, "val", cats + [{"id": 3, "name": "fox"}], _boxes([1, 2, 3, 2]))
    code, stdout, err = _main(capsys, "--dataset_file", "coco", "--coco_path", tmp_path, "--output_dir",
                              tmp_path / "out", "--epochs", "1", "--batch_size", "2")
    assert code is None, err
    assert ("warning: the training and validation files have different categories: ids only in the training file: "
            "[4]; ids only in the validation file: [3]") in err
    assert "num_classes = 5" in stdout
    state = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert state["label_map"] == [[0, None], [1, "cat"], [2, "dog"], [3, "fox"], [4, "bird"]]


@pytest.mark.parametrize("kind", ["crowd", "segmentation", "empty"])
def test_a_split_without_a_usable_box_is_an_error_naming_it(tmp_path, capsys, kind):
    cats = [{"id": 1, "name": "cat"}]
    _write_split(tmp_path, "train", cats, _boxes([1, 1]))
    val = {"crowd": _boxes([1, 1], iscrowd=1), "empty": [],
           "segmentation": [{"category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]}]}[kind]
    _write_split(tmp_path, "val", cats, val)
    code, _, err = _main(capsys, "--dataset_file", "coco", "--coco_path", tmp_path, "--epochs", "1")
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith(f"error: {tmp_path / 'annotations' / 'instances_val2017.json'}: the val "
                                         "split has no usable box"), last
    assert {"crowd": "crowd regions", "segmentation": "has a usable bbox", "empty": "no annotations"}[kind] in last


def test_huge_category_ids_are_an_error_not_a_huge_class_head(tmp_path, capsys):
    cats = [{"id": 1, "name": "cat"}, {"id": 10**9, "name": "dog"}]
    for split in ("train", "val"):
        _write_split(tmp_path, split, cats, _boxes([1, 10**9]))
    code, _, err = _main(capsys, "--dataset_file", "coco", "--coco_path", tmp_path, "--epochs", "1")
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: category ids up to {10**9} for 2 categories would need a {10**9 + 1}-way class head: renumber the "
        "category ids (e.g. 1..2) in the annotation files")


def test_a_checkpoint_whose_stored_configuration_is_incomplete_or_wrong_is_one_line(trained, tmp_path):
    state = torch.load(trained[0], weights_only=True)
    cases = [({k: v for k, v in state["config"].items() if k != "hidden_dim"}, "its stored configuration lacks "
              "hidden_dim"),
             ({**state["config"], "hidden_dim": "wide"}, "--hidden_dim: expected an integer, got 'wide'"),
             ({**state["config"], "num_classes": 10**9}, "--num_classes must be <= 10000, got 1000000000"),
             ({**state["config"], "sr_ratios": [2, 1]}, "--sr_ratios needs 4 values")]
    for config, message in cases:
        path = tmp_path / "bad.pth"
        torch.save({**state, "config": config}, path)
        with pytest.raises(CheckpointError) as info:
            Detector.from_checkpoint(path, device="cpu")
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Divergence and feedback


def test_diverged_weights_are_the_documented_non_finite_stop(demo_data, tmp_path, capsys, monkeypatch):
    """NaN weights: the predictions are caught before the matcher and the run stops with the step and the losses
    in one line (or skips the steps under --max_nonfinite_steps); no FloatingPointError traceback."""
    from pvt_detr import detr

    original = detr.DETR.forward

    def diverged(self, samples):
        with torch.no_grad():
            self.class_embed.weight.fill_(float("nan"))
        return original(self, samples)

    monkeypatch.setattr(detr.DETR, "forward", diverged)
    code, _, err = _main(capsys, "--coco_path", demo_data, "--epochs", "1", "--output_dir", tmp_path / "a")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: non-finite predictions (NaN or inf in the predicted classes or "
                                            "boxes) at epoch 0 step 0/3: loss=nan")
    code, _, err = _main(capsys, "--coco_path", demo_data, "--epochs", "1", "--output_dir", tmp_path / "b",
                         "--max_nonfinite_steps", "1")
    assert code == 1 and "warning: skipping step: non-finite predictions" in err
    assert "(skipped 1 such steps, --max_nonfinite_steps 1)" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_without_a_terminal_the_run_prints_progress_lines(demo_data, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *TINY, "--coco_path", str(demo_data),
                           "--output_dir", str(tmp_path / "out"), "--epochs", "1", "--print_freq", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # stderr is a pipe: no terminal
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch 0 step ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0 step 1/3", "epoch 0 step 2/3", "epoch 0 step 3/3"]
    for line in lines:
        assert float(line.split("loss ")[1].split(",")[0]) > 0 and "lr 5.00e-04" in line and "images/s" in line
