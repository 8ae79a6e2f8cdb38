"""The model library imports only torch, torchvision, einops, scipy and itself (STYLE.md habit 9)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pvt_detr"
ALLOWED_ROOTS = {"torch", "torchvision", "einops", "scipy", "numpy", "pvt_detr", "__future__", "math", "re", "pickle",
                 "dataclasses", "collections", "pathlib", "typing", "itertools", "functools", "copy", "warnings",
                 "types", "platform"}  # types: SimpleNamespace, what a pickled argparse.Namespace is read as
# (checkpoints.py); platform: matmul.py uses oneDNN on x86-64 only
FORBIDDEN = ("torch.distributed", "submitit", "datasets", "slurm", "training", "main")
# Command-line entry points inside the package (and the benchmark's op timer) may also parse arguments, read images
# and time things.
CLI_MODULES = {"predict.py", "export.py"}
CLI_EXTRA = {"argparse", "json", "sys", "os", "time", "statistics", "subprocess", "resource", "PIL", "tqdm",
             "tempfile", "shutil", "platform", "io", "onnx", "onnxruntime", "threading", "inference", "logging",
             "contextlib"}  # logging, contextlib: export.py quiets the exporters' loggers while it reports itself
# The inference API decodes image files (PIL, as datasets/coco.py does) and rebuilds a model from a checkpoint's
# config (a types.SimpleNamespace); it parses no arguments and prints nothing.
IMAGE_IO_MODULES = {"inference.py", "image_io.py"}
IMAGE_IO_EXTRA = {"PIL"}


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
    assert len(files) > 10
    problems = []
    for path in files:
        allowed = ALLOWED_ROOTS | (CLI_EXTRA if path.name in CLI_MODULES else set()) \
            | (IMAGE_IO_EXTRA if path.name in IMAGE_IO_MODULES else set())
        for name in _imports(path):
            if name.startswith(FORBIDDEN) or name.split(".")[0] not in allowed:
                problems.append(f"{path.relative_to(PKG.parent)} imports {name}")
    assert not problems, problems
