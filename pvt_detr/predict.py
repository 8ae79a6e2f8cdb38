"""Command line detection with a trained checkpoint: a COCO-results JSON and one annotated PNG per image.

    python -m pvt_detr.predict --checkpoint outputs/demo/checkpoint.pth --threshold 0.5 --out results/ img1.jpg dir/

Inputs are image files and folders (their image files, not recursive, sorted by name). Writes
`OUT/predictions.json`: a list of {file_name, image_id (only when the file name is a number, as in COCO),
category_id, category_name, bbox [x, y, w, h] in the image's pixels, score}, and `OUT/<name>.png`: the image with
its detections drawn (`pvt_detr.visualize.draw_on_image`; small images enlarged so that captions can be read).
Images are read as the evaluation reads them (`pvt_detr.inference`). Unreadable files are skipped with one line
each on stderr; the exit code is 0 if at least one image was processed, else 1 with a one-line error. The inputs
are never written over: an --out that is or holds one of the inputs is refused, and so are outputs of an earlier
run in --out unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

from pvt_detr.checkpoints import CheckpointError
from pvt_detr.cli import OneLineParser, expand_path, number
from pvt_detr.inference import Detector, ImageReadError, load_image
from pvt_detr.visualize import draw_on_image

IMAGE_SUFFIXES = {s.lower() for s in Image.registered_extensions()}  # .jpg, .png, .bmp, .webp, .tif, ...


class PredictError(RuntimeError):
    """The command cannot do anything useful; the message is one line."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser("python -m pvt_detr.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=expand_path, help="image files and/or folders of images")
    parser.add_argument("--checkpoint", required=True, type=expand_path,
                        help="pvt-detr checkpoint written by main.py (checkpoint.pth)")
    parser.add_argument("--out", default="predictions", type=expand_path,
                        help="output folder for predictions.json and the PNGs (not a folder of the inputs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace predictions.json and PNGs that --out already holds")
    parser.add_argument("--threshold", default=0.5, type=number(float, 0, 1), help="keep detections with score >= this")
    parser.add_argument("--batch_size", default=4, type=number(int, 1, 4096), help="images per forward pass")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (compiles on the first batch of each image size)")
    parser.add_argument("--no_draw", action="store_true", help="write predictions.json only, no PNGs")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (off anyway when not a TTY)")
    return parser


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (by suffix, sorted); PredictError if a path is missing."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise PredictError(f"{name}: no such file or folder")
    return files


def check_outputs(out: Path, inputs: list[str], files: list[Path], targets: list[str], overwrite: bool) -> None:
    """PredictError (one line) when --out is or holds one of the inputs, or already holds a file this run would
    write (unless `overwrite`): the inputs are never written over, and earlier outputs only when asked."""
    resolved = out.resolve()
    if any(Path(name).resolve() == resolved for name in inputs) or any(f.resolve() == resolved for f in files):
        raise PredictError(f"--out {out} is one of the inputs: choose another output folder")
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out} is a file, not a folder: choose another output folder")
    inside = [f for f in files if f.resolve().parent == resolved]
    if inside:
        raise PredictError(f"--out {out} holds input images (e.g. {inside[0]}), which the annotated PNGs would "
                           "replace: choose another output folder")
    existing = [out / name for name in targets if (out / name).exists()]
    if existing and not overwrite:
        raise PredictError(f"--out {out} already holds {existing[0].name}"
                           + (f" and {len(existing) - 1} more of this run's outputs" if len(existing) > 1 else "")
                           + ": pass --overwrite to replace them, or choose another output folder")


def image_id_of(path: Path) -> int | None:
    """COCO's convention: 000000397133.jpg has image id 397133; other names have none."""
    return int(path.stem) if path.stem.isdigit() else None


def unique_png_names(paths: list[Path]) -> list[str]:
    """`<stem>.png` per image; repeated stems get `-2`, `-3`, ... in input order."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(f"{path.stem}.png" if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}.png")
    return names


def draw(image: Image.Image, detections, categories: dict[int, str]) -> Image.Image:
    """RGB PIL image + Detections -> PIL image with labelled boxes (small images enlarged to be readable)."""
    return draw_on_image(image, detections.boxes, detections.labels, detections.scores, categories)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="img", dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    """Predicts every input image; returns the exit code. Raises PredictError / CheckpointError on fatal errors."""
    files = collect_images(args.inputs)
    if not files:
        raise PredictError(f"no image files found in {', '.join(args.inputs)}")
    out = Path(args.out)
    png_names = dict(zip(files, unique_png_names(files)))
    check_outputs(out, args.inputs, files, ["predictions.json", *([] if args.no_draw else png_names.values())],
                  args.overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PredictError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    try:
        detector = Detector.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                            compile=args.compile)
    except ValueError as err:  # device
        raise PredictError(str(err)) from None
    bar = _progress_bar(len(files), not args.no_progress and sys.stderr.isatty())
    def report(line: str) -> None:  # above the progress bar if there is one
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    rows: list[dict] = []
    done, skipped, start = 0, 0, time.time()
    for first in range(0, len(files), args.batch_size):
        images, paths = [], []
        for path in files[first : first + args.batch_size]:
            try:
                images.append(load_image(path))
                paths.append(path)
            except ImageReadError as err:
                skipped += 1
                report(f"skipped {path}: {str(err).removeprefix(f'cannot read image {path}: ')}")
                if bar is not None:
                    bar.update(1)
        if not images:
            continue
        for path, image, det in zip(paths, images, detector.predict(images, score_threshold=args.threshold)):
            image_id = image_id_of(path)
            rows += det.to_coco(file_name=str(path), **({"image_id": image_id} if image_id is not None else {}))
            if not args.no_draw:
                draw(image, det, detector.categories).save(out / png_names[path])
            done += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if done == 0:
        raise PredictError(f"none of the {len(files)} input images could be read")
    tmp = out / f".predictions.json.tmp-{os.getpid()}"
    tmp.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")  # one detection per line
    tmp.replace(out / "predictions.json")
    pngs = "" if args.no_draw else f" and {done} PNG(s)"
    print(f"{done} image(s), {len(rows)} detection(s) with score >= {args.threshold} -> {out / 'predictions.json'}"
          f"{pngs}; {skipped} skipped ({time.time() - start:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as exit_:  # a flag error (one line already printed) or --help
        return int(exit_.code or 0)
    try:
        return run(args)
    except (PredictError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except OSError as err:  # writing a PNG or predictions.json: read-only, disk full, ...
        print(f"error: {err.filename or args.out}: cannot write it ({err.strerror or err})", file=sys.stderr,
              flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
