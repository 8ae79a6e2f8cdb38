"""The README's Python examples run as written, and its first two commands are the set-up commands."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_demo_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_model_example_runs_and_detects_in_image_coordinates():
    namespace: dict = {}
    with torch.no_grad():
        exec(_python_blocks()[0], namespace)
    (det,) = namespace["detections"]
    assert det["boxes"].shape == (100, 4) and det["scores"].shape == (100,)
    assert namespace["x"].shape == (3, 800, 1066)
    assert (det["boxes"][:, 2] <= 640 + 1e-3).all() and (det["boxes"][:, 3] <= 480 + 1e-3).all()


def test_backbone_sentence_runs():
    from pvt_detr import build_backbone

    assert 'build_backbone("pvt_small").forward_features(x)' in README.read_text()
    with torch.no_grad():
        maps = build_backbone("pvt_small").forward_features(torch.randn(1, 3, 333, 517))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 83, 129), (1, 128, 41, 64), (1, 320, 20, 32), (1, 512, 10, 16)]


def test_detector_example_runs_on_a_trained_checkpoint(tmp_path_factory, capsys):
    from tests.tiny_detector import tiny_checkpoint

    checkpoint, data = tiny_checkpoint(tmp_path_factory)
    image = sorted((data / "val2017").glob("*.jpg"))[0]
    code = _python_blocks()[1].replace("outputs/demo/checkpoint.pth", str(checkpoint))
    code = code.replace("data/demo/val2017/000000000001.jpg", str(image)).replace("score_threshold=0.5",
                                                                                 "score_threshold=0.0")
    exec(code, {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6  # the tiny model's 6 queries, all shown at threshold 0
    assert all(line.split()[0] in ("rectangle", "ellipse", "triangle") and " at [" in line for line in lines)
