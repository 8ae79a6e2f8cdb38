"""Draws the README's docs/demo_predictions.png: a trained model's detections on the first validation images.

    python docs/make_demo_figure.py --checkpoint outputs/demo/checkpoint.pth --images data/demo/val2017

Images are enlarged (`--scale`, nearest neighbour) before drawing so that captions stay readable, laid out in a
grid and saved as a 256-colour PNG (small enough for the repository).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from pvt_detr.inference import Detector, load_image  # noqa: E402
from pvt_detr.predict import IMAGE_SUFFIXES  # noqa: E402
from pvt_detr.visualize import draw_on_image  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="outputs/demo/checkpoint.pth")
    parser.add_argument("--images", default="data/demo/val2017", help="folder of images (the first --count are used)")
    parser.add_argument("--out", default="docs/demo_predictions.png")
    parser.add_argument("--count", default=6, type=int)
    parser.add_argument("--columns", default=3, type=int)
    parser.add_argument("--scale", default=4, type=int, help="enlargement of every image before drawing")
    parser.add_argument("--threshold", default=0.5, type=float)
    args = parser.parse_args(argv)

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.count]
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu")
    tiles = []
    detections = detector.predict(files, score_threshold=args.threshold)
    for path, det in zip(files, detections):
        image = load_image(path)
        tiles.append(draw_on_image(image, det.boxes, det.labels, det.scores, detector.categories,
                                   min_side=max(image.size) * args.scale))
    gap = 4
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // args.columns)
    sheet = Image.new("RGB", (args.columns * (width + gap) - gap, rows * (height + gap) - gap), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % args.columns) * (width + gap), (i // args.columns) * (height + gap)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=256, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"{out}: {len(tiles)} images, {sum(len(d) for d in detections)} detections with score >= "
          f"{args.threshold}, {out.stat().st_size / 1e3:.0f} kB")
    return out


if __name__ == "__main__":
    main()
