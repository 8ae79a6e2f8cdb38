"""End to end through the CLI: a subprocess running main.py on a tiny generated dataset."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset_file", "demo", "--demo_train_images", "12", "--demo_val_images", "6", "--demo_image_size", "64",
        "--backbone", "pvt_nano", "--backbone_stages", "3", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1",
        "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "6", "--train_sizes", "64", "--max_size", "96",
        "--test_size", "64", "--batch_size", "4", "--num_workers", "0", "--lr_drop", "1", "--seed", "3",
        "--lr", "5e-4", "--no_progress", "--device", "cpu"]


def run_main(*args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *TINY, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data, out = base / "data", base / "run"
    proc = run_main("--coco_path", data, "--output_dir", out, "--epochs", "2", "--plot_predictions", "2")
    return data, out, proc


@pytest.mark.slow
def test_two_epochs_write_every_output(trained):
    data, out, proc = trained
    for name in ("checkpoint.pth", "checkpoint0000.pth", "config.yaml", "log.txt", "results_val.json", "curves.png"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]
    assert all(len(e["test_coco_eval_bbox"]) == 12 and e["train_loss"] > 0 for e in log)
    assert {"train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_class_error", "train_lr"} <= set(log[0])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["backbone"] == "pvt_nano" and config["num_classes"] == 8 and config["train_sizes"] == [64]
    results = json.loads((out / "results_val.json").read_text())
    assert len(results) == 6 * 6 and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((out / "predictions").glob("*.png"))) == 2
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
    assert "num_classes = 8" in proc.stdout
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 0 and state["config"]["lr"] == 5e-4


@pytest.mark.slow
def test_eval_only_reproduces_the_final_epoch(trained, tmp_path):
    data, out, _ = trained
    run_main("--coco_path", data, "--output_dir", tmp_path, "--eval", "--resume", out / "checkpoint.pth")
    final = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_coco_eval_bbox"]
    evaluated = json.loads((tmp_path / "final_stats.json").read_text())["coco_eval_bbox"]
    assert evaluated == pytest.approx(final, abs=1e-9)
    assert json.loads((tmp_path / "results_val.json").read_text()) == json.loads((out / "results_val.json").read_text())


@pytest.mark.slow
def test_resume_from_epoch_one_equals_uninterrupted_run(trained, tmp_path):
    data, out, _ = trained
    run_main("--coco_path", data, "--output_dir", tmp_path, "--epochs", "1")
    first = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert first["epoch"] == 1
    run_main("--coco_path", data, "--output_dir", tmp_path, "--epochs", "2", "--resume", tmp_path / "checkpoint.pth")
    resumed = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    uninterrupted = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-6, atol=1e-7, msg=key)
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]


def test_resuming_a_finished_run_says_there_is_nothing_to_train(trained, tmp_path):
    _, out, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = torch.load(copy / "checkpoint.pth", weights_only=True)
    proc = run_main("--coco_path", trained[0], "--output_dir", copy, "--epochs", "2", "--resume", "auto")
    assert "nothing to train: the run is at epoch 2 and --epochs is 2" in proc.stdout
    after = torch.load(copy / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == 2 and all(torch.equal(after["model"][k], v) for k, v in before["model"].items())


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    cases = [(["--backbone", "resnet50"], "argument --backbone: invalid choice: 'resnet50'"),
             (["--dataset_file", "coco", "--coco_path", tmp_path / "nope"], "no such folder"),
             (["--resume", tmp_path / "missing.pth"], "no such file"),
             (["--config", tmp_path / "missing.yaml"], "no such file"),
             (["--finetune", "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"], "a URL; pvt-detr never"),
             (["--train_sizes", "64,abc"], "argument --train_sizes: expected an integer, got 'abc'"),
             (["--position_embedding", "learned", "--max_size", "1700"], "covers at most 50 x 50 feature cells"),
             (["--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
             (["--sr_ratios", "8,4,2"], "argument --sr_ratios: needs 4 values (one per stage), got 3: 8,4,2"),
             (["--local_layers", "1,1,-1,0"], "argument --local_layers: must be >= 0, got -1"),
             (["--anchor_queries", "--anchor_size", "1.5"], "argument --anchor_size: must be < 1, got 1.5"),
             (["--dropout", "1"], "argument --dropout: must be < 1, got 1.0"),
             (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
             (["--weight_decay", "nan"], "argument --weight_decay: must be a finite number, got nan"),
             (["--clip_max_norm", "nan"], "argument --clip_max_norm: must be a finite number, got nan"),
             (["--lr_drop", "-1"], "argument --lr_drop: must be >= 1, got -1"),
             (["--num_classes", "1000000000"], "argument --num_classes: must be <= 10000, got 1000000000"),
             (["--two_stage"], "--two_stage needs --anchor_queries"),
             (["--config", ROOT / "configs" / "demo.yaml", "--no_anchor_queries"],
              "--two_stage needs --anchor_queries"),
             (["--two_stage", "--no_two_stage"], "not allowed with argument"),
             (["--eval", "--resume", "auto", "--finetune", ROOT / "README.md"], "give one of them"),
             (["--start_epoch", "5", "--epochs", "3"], "--start_epoch 5 leaves nothing to train with --epochs 3")]
    # Two through a real main.py process (an argparse error and a value check); the rest through the same parser
    # in this process, which is what main.py runs before anything else (a new process costs seconds of imports).
    for args, message in cases[:1] + cases[-1:]:
        proc = run_main(*args, check=False, timeout=60)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.strip().splitlines() == [f"error: {message}"] or \
            message in proc.stderr.strip().splitlines()[-1], (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "usage" not in proc.stderr, proc.stderr
    sys.path.insert(0, str(ROOT))
    import main
    from training.config import parse_args

    for args, message in cases[1:-1]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            parse_args(main.build_cli_parser(), [*TINY, *map(str, args)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert message in err, (args, err)


def test_help_prints_the_usage_and_every_flag(capsys):
    sys.path.insert(0, str(ROOT))
    import main

    with pytest.raises(SystemExit) as exit_info:
        main.build_cli_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: python main.py")
    for flag in ("--lr LR", "--backbone", "--sr_ratios", "--no_aux_loss", "--progress", "--no_tf32", "--compile"):
        assert flag in out, flag


def test_an_output_dir_that_cannot_be_written_is_a_one_line_error_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_main("--output_dir", blocker / "out", "--coco_path", tmp_path / "data", check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: --output_dir {blocker / 'out'}: cannot write there: " \
                                                    "Not a directory"
    assert "Traceback" not in proc.stderr and "training" not in proc.stdout and not (tmp_path / "data").exists()


def test_config_file_sets_defaults_and_cli_wins(tmp_path):
    sys.path.insert(0, str(ROOT))
    import main
    from training.config import parse_args

    cfg = tmp_path / "exp.yaml"
    cfg.write_text("lr: 3.0e-4\ntrain_sizes: [96, 128]\nbackbone: pvt_tiny\npre_norm: true\n")
    parser = main.get_args_parser()
    args = parse_args(parser, ["--config", str(cfg), "--dataset_file", "demo", "--lr", "1e-3"])
    assert args.lr == 1e-3 and args.train_sizes == (96, 128) and args.backbone == "pvt_tiny" and args.pre_norm
    # every on/off flag can be undone on the command line, whatever the file says
    cfg.write_text("pre_norm: true\naux_loss: false\nanchor_queries: true\ntwo_stage: true\nfocal_loss: true\n"
                   "amp: true\nno_progress: true\n")
    switches = ["pre_norm", "aux_loss", "anchor_queries", "two_stage", "focal_loss", "amp", "no_progress"]
    from_file = parse_args(main.get_args_parser(), ["--config", str(cfg), "--dataset_file", "demo"])
    assert [getattr(from_file, k) for k in switches] == [True, False, True, True, True, True, True]
    undone = parse_args(main.get_args_parser(), [
        "--config", str(cfg), "--dataset_file", "demo", "--no_pre_norm", "--aux_loss", "--no_two_stage",
        "--no_anchor_queries", "--no_focal_loss", "--no_amp", "--progress"])
    assert [getattr(undone, k) for k in switches] == [False, True, False, False, False, False, False]
    plain = parse_args(main.get_args_parser(), ["--dataset_file", "demo"])
    assert [getattr(plain, k) for k in switches] == [False, True, False, False, False, False, False]
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(SystemExit):
        parse_args(main.get_args_parser(), ["--config", str(cfg), "--dataset_file", "demo"])


@pytest.mark.parametrize("text,message", [
    (b"lr: [1, 2\n", "not valid YAML"),
    (b"learning_rate: 1\n", "unknown keys learning_rate"),
    (b"- lr\n- 1\n", "expected a mapping of flag names to values"),
    (b"lr: fast\n", "lr: expected a number, got 'fast'"),
    (b"lr: true\n", "lr: expected a number, got True"),
    (b"lr: .nan\n", "lr must be a finite number, got nan"),
    (b"lr_drop: -1\n", "lr_drop must be >= 1, got -1"),
    (b"epochs: 2.5\n", "epochs: expected an integer, got 2.5"),
    (b"epochs:\n", "epochs: needs a value (its default is 50)"),
    (b"train_sizes: abc\n", "train_sizes: expected an integer, got 'abc'"),
    (b"backbone: pvt_huge\n", "backbone 'pvt_huge' is not one of"),
    (b"pre_norm: maybe\n", "pre_norm: expected true or false, got 'maybe'"),
    (b"\xff\xfe\x00lr: 1\n", "not a readable UTF-8 text file"),
    (b"a: &x [1, 2]\nb: *x\n", "YAML anchors and aliases (&, *) are not accepted"),
    (b"lr: " + b"1" * (1 << 20) + b"\n", "larger than 1024 KiB"),
])
def test_bad_config_files_are_one_line_errors_naming_the_file(tmp_path, capsys, text, message):
    sys.path.insert(0, str(ROOT))
    import main
    from training.config import parse_args

    cfg = tmp_path / "exp.yaml"
    cfg.write_bytes(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(main.get_args_parser(), ["--config", str(cfg), "--dataset_file", "demo"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 1 and f"--config {cfg}: {message}" in last, last


@pytest.mark.slow
def test_amp_on_cpu_trains_in_bfloat16_close_to_float32(trained, tmp_path):
    """--amp on the CPU runs the forward under bfloat16 autocast: the same run's first epoch ends at a finite loss
    close to, but not bit-equal with, the float32 one (the fixture's run, same data and seed)."""
    data, fp32_out, _ = trained
    proc = run_main("--coco_path", data, "--output_dir", tmp_path / "amp", "--epochs", "1", "--amp")
    assert "mixed precision: bfloat16 autocast on cpu" in proc.stdout
    amp = json.loads((tmp_path / "amp" / "log.txt").read_text().splitlines()[0])
    fp32 = json.loads((fp32_out / "log.txt").read_text().splitlines()[0])
    assert math.isfinite(amp["train_loss"]) and len(amp["test_coco_eval_bbox"]) == 12
    assert amp["train_loss"] != fp32["train_loss"]  # autocast did change the arithmetic
    assert amp["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)
