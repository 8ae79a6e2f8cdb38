"""Image decoding shared by the datasets and the inference API: any PIL-readable file -> 8-bit RGB, displayed frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL modes of 16-bit (and 32-bit int) images


class ImageReadError(OSError):
    """An image file that cannot be decoded; the message is one line naming the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, P, RGBA, LA, CMYK, YCbCr, I;16, I, F, ...) -> 8-bit RGB."""
    if image.mode in SIXTEEN_BIT_MODES:  # PIL's own conversion clips 16-bit values at 255
        values = np.asarray(image, dtype=np.float64)  # (H, W) in 0..65535
        return Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
    return image.convert("RGB")


def read_image(path: str | Path, expected_size: tuple[int, int] | None = None,
               warn: Callable[[str, str], None] | None = None) -> Image.Image:
    """Decodes an image file as 8-bit RGB in its displayed orientation (EXIF orientation applied).

    expected_size: (width, height) from an annotation file, whose boxes are in the displayed frame (COCO's
    convention). If only the stored frame has that size, the orientation tag is ignored (the annotations were
    made on the stored pixels); if neither has it, the file's own size is used (an image is never resized to a
    size only the annotation file declares). A corrupt EXIF block leaves the stored frame. Each of these calls
    `warn(path, message)` if given.
    Raises ImageReadError (one line naming the file) for a missing, truncated or corrupt file.
    """
    warn = warn or (lambda _path, _message: None)
    try:
        with Image.open(path) as stored:
            stored.load()  # decode now: truncated and corrupt files fail here
            try:
                image = ImageOps.exif_transpose(stored)
            except Exception as err:  # a corrupt EXIF block: PIL raises anything from ValueError to struct.error
                warn(str(path), f"{path}: unreadable EXIF orientation ({err}); using the stored frame")
                image = stored
            if expected_size is not None and image.size != tuple(expected_size):
                w, h = expected_size
                if stored.size == (w, h):
                    warn(str(path), f"{path}: annotated as {w}x{h}, the stored frame; EXIF orientation ignored")
                    image = stored
                else:
                    warn(str(path), f"{path}: image is {image.width}x{image.height} but annotated as {w}x{h}; "
                                    "using the file's size (boxes outside it are clipped)")
            return to_rgb(image)
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"cannot read image {path}: is a folder") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        # OSError covers PIL.UnidentifiedImageError and truncated files
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImageReadError(f"cannot read image {path}: {message}") from None
