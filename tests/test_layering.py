"""The model library never imports training, data, distributed, SLURM or benchmark code (STYLE.md habit 9), and its
model modules run without the command-line plumbing: checked on every file, with no exemptions."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pvt_detr"
# Third-party packages pvt_detr may import: the model's (torch, torchvision, einops, scipy, numpy), image decoding
# (PIL) and the ONNX export and its check (onnx, onnxruntime, onnxscript); tqdm for the predict progress bar.
THIRD_PARTY = {"torch", "torchvision", "einops", "scipy", "numpy", "PIL", "onnx", "onnxruntime", "onnxscript", "tqdm"}
FORBIDDEN = ("torch.distributed", "submitit", "datasets", "slurm", "training", "main", "benchmarks", "pycocotools",
             "faster_coco_eval")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_model_library_imports_nothing_from_training_data_distributed_or_slurm():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 15
    allowed = THIRD_PARTY | {"pvt_detr"} | set(sys.stdlib_module_names)
    problems = [f"{path.relative_to(PKG.parent)} imports {name}" for path in files for name in _imports(path)
                if name.startswith(FORBIDDEN) or name.split(".")[0] not in allowed]
    assert not problems, problems


def test_building_and_running_the_model_loads_no_command_line_or_distributed_module():
    code = ("import sys, torch; from pvt_detr import ModelConfig, build_model; "
            "m = build_model(ModelConfig(backbone='pvt_nano', hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, "
            "dim_feedforward=32, num_queries=4, num_classes=3))[0].eval(); m([torch.rand(3, 64, 64)]); "
            "print(sorted(n for n in sys.modules if n.startswith(('pvt_detr.predict', 'pvt_detr.export', "
            "'pvt_detr.cli', 'datasets', 'training', 'submitit', 'pycocotools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    assert out.strip() == "[]"
