"""`python -m pvt_detr.predict`: COCO-results JSON and annotated PNGs, skipped unreadable files, one-line errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pvt_detr import predict
from pvt_detr.inference import Detector, load_image
from tests.tiny_detector import ROOT, tiny_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def run(trained, tmp_path_factory):
    """The CLI on a folder of 3 validation images, an unreadable .jpg and a text file, plus one explicit image."""
    checkpoint, data = trained
    base = tmp_path_factory.mktemp("predict")
    folder = base / "images"
    folder.mkdir()
    for path in sorted((data / "val2017").glob("*.jpg"))[:3]:
        shutil.copy(path, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (folder / "notes.txt").write_text("not an image")
    extra = base / "wide photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 130, 3), dtype=np.uint8)).save(extra)
    out = base / "out"
    proc = subprocess.run([sys.executable, "-m", "pvt_detr.predict", "--checkpoint", str(checkpoint), "--threshold",
                           "0", "--batch_size", "3", "--out", str(out), str(folder), str(extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return checkpoint, folder, extra, out, proc


@pytest.mark.slow
def test_writes_coco_results_and_annotated_pngs(run):
    checkpoint, folder, extra, out, proc = run
    assert proc.returncode == 0, proc.stderr
    images = sorted(folder.glob("*.jpg"))[:3] + [extra]
    state = torch.load(checkpoint, weights_only=True)
    rows = json.loads((out / "predictions.json").read_text())
    queries = state["config"]["num_queries"]
    assert len(rows) == 4 * queries  # threshold 0: every query of every readable image
    assert {r["file_name"] for r in rows} == {str(p) for p in images}
    for row in rows:
        assert set(row) >= {"file_name", "category_id", "category_name", "bbox", "score"}
        assert row["category_name"] == dict(state["label_map"])[row["category_id"]] and 0 <= row["score"] <= 1
        assert len(row["bbox"]) == 4 and row["bbox"][2] >= 0 and row["bbox"][3] >= 0
    # COCO file names carry the image id; others do not.
    assert all(r["image_id"] == int(images[0].stem) for r in rows if r["file_name"] == str(images[0]))
    assert not any("image_id" in r for r in rows if r["file_name"] == str(extra))
    # The API gives the same detections for the same files.
    detections = Detector.from_checkpoint(checkpoint, device="cpu").predict(images, score_threshold=0.0)
    for path, det in zip(images, detections):
        mine = [r for r in rows if r["file_name"] == str(path)]
        assert [r["score"] for r in mine] == pytest.approx(det.scores.tolist(), abs=1e-4)

    for path in images:
        png = out / f"{path.stem}.png"
        drawn = np.asarray(Image.open(png).convert("RGB")).astype(int)  # (H, W, 3)
        image = load_image(path)
        scale = -(-512 // max(image.size))  # small images are drawn enlarged by a whole factor, to be readable
        assert scale > 1 and drawn.shape == (image.height * scale, image.width * scale, 3), png
        original = np.asarray(image.resize((image.width * scale, image.height * scale), Image.NEAREST)).astype(int)
        changed = np.abs(drawn - original).sum(-1) > 0  # (H, W)
        h, w = changed.shape
        for row in (r for r in rows if r["file_name"] == str(path)):
            x, y, bw, bh = (v * scale for v in row["bbox"])
            left, top = min(max(round(x), 0), w - 1), min(max(round(y), 0), h - 1)
            right, bottom = min(max(round(x + bw), 0), w - 1), min(max(round(y + bh), 0), h - 1)
            # Each box outline is drawn: its corners (clamped to the image, as draw_detections does) changed.
            for cy, cx in ((top, left), (top, right), (bottom, left), (bottom, right)):
                assert changed[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2].any(), (png, row["bbox"])
        assert changed.mean() < 0.9
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in images)


@pytest.mark.slow
def test_unreadable_file_is_skipped_and_reported(run):
    _, folder, _, _, proc = run
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and str(folder / "broken.jpg") in skipped[0]
    assert "notes.txt" not in proc.stderr and "Traceback" not in proc.stderr
    assert "img/s" not in proc.stderr  # no progress bar when stderr is not a terminal
    assert "4 image(s)" in proc.stdout and "1 skipped" in proc.stdout


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(image)
    assert predict.main(["--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out"),
                         str(image)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no such checkpoint file" in err[0]
    assert predict.main(["--checkpoint", "x.pth", str(tmp_path / "nope")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_no_readable_image_exits_1(trained, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    assert predict.main(["--checkpoint", str(trained[0]), "--out", str(tmp_path / "out"), str(broken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"skipped {broken}") and err[-1] == "error: none of the 1 input images could be read"


@pytest.mark.slow
def test_readme_figure_script(trained, tmp_path):
    import runpy

    figure = runpy.run_path(str(ROOT / "docs" / "make_demo_figure.py"))
    out = figure["main"](["--checkpoint", str(trained[0]), "--images", str(trained[1] / "val2017"), "--out",
                          str(tmp_path / "demo.png"), "--threshold", "0", "--count", "4", "--columns", "2"])
    image = Image.open(out)
    assert image.size == (2 * 320 + 4, 2 * 320 + 4) and out.stat().st_size < 200_000  # 80 px images, 4x
