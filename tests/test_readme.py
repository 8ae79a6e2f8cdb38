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


def test_backbone_example_runs():
    namespace: dict = {"torch": torch}
    with torch.no_grad():
        exec(_python_blocks()[1], namespace)
    assert [tuple(m.shape) for m in namespace["maps"]] == [(1, 64, 83, 129), (1, 128, 41, 64), (1, 320, 20, 32),
                                                          (1, 512, 10, 16)]
