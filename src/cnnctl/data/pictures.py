"""Picture files (PNG, JPEG, BMP, GIF, WebP) decoded with Pillow (the `images` extra) into uint8 arrays of an input
shape: what the folder and csv formats, predict and explain read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cnnctl.core.memory import refuse_over
from cnnctl.errors import DataError
from cnnctl.extras import require

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def pillow():
    require("PIL.Image", "images", "decoding picture files (PNG, JPEG, ...) needs Pillow, which is not installed",
            DataError)
    from PIL import Image
    return Image


# the formats cnnctl decodes, by Pillow's name: nothing else is opened whatever a file's name or content (a
# PostScript file named .png would otherwise run Ghostscript, an external program)
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit (and 32-bit integer) grayscale


class NotAPicture(ValueError):
    """A file that is no picture in one of FORMATS."""


class TooManyPixels(ValueError):
    """A picture larger than the bound it was decoded under, or than Pillow decodes at all."""


def decode_image(path: Path | BinaryIO, input_shape, resize: int | None = None,
                 max_pixels: int | None = None) -> np.ndarray:
    """One picture file (a path or a binary file object) as uint8 (C, H, W) of the input shape: grayscale (C 1) or
    RGB (C 3), resized bilinearly (with `resize`: its shorter side to `resize` pixels, aspect kept, then the centre
    H x W cut out). 16-bit grayscale keeps its range (0..65535 becomes 0..255; Pillow's convert would clip it to
    255). Raises ValueError with the reason for anything that is not a readable image of a documented format
    (NotAPicture when it is none), TooManyPixels past `max_pixels` (read from the header, before any decoding) or
    past the size Pillow opens at all."""
    Image = pillow()
    c, h, w = input_shape
    try:
        with Image.open(path, formats=FORMATS) as im:
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                raise TooManyPixels(f"{im.size[0]} x {im.size[1]} pixels, more than {max_pixels:,}")
            if im.mode in WIDE_MODES:
                wide = np.asarray(im, dtype=np.float64)  # only 16-bit PNGs decode to these modes
                im = Image.fromarray(np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
            im = im.convert("L" if c == 1 else "RGB")
            if resize is None:
                im = im.resize((w, h), Image.BILINEAR)
            else:  # torchvision's Resize(resize) then CenterCrop((h, w))
                short, long_ = sorted(im.size)
                scaled = (resize, int(resize * long_ / short))
                im = im.resize(scaled if im.size[0] <= im.size[1] else scaled[::-1], Image.BILINEAR)
                top, left = int(round((im.size[1] - h) / 2.0)), int(round((im.size[0] - w) / 2.0))
                im = im.crop((left, top, left + w, top + h))
            arr = np.asarray(im, dtype=np.uint8)
    except (MemoryError, TooManyPixels):
        raise
    except Image.DecompressionBombError as e:  # past twice Image.MAX_IMAGE_PIXELS: Pillow refuses to open it
        raise TooManyPixels(f"more pixels than Pillow decodes ({e})") from None
    except Image.UnidentifiedImageError:
        raise NotAPicture(f"not a picture in one of the formats cnnctl reads ({', '.join(FORMATS)})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for damaged files
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def decode_images(paths: list[Path], input_shape, where: str, resize: int | None = None) -> np.ndarray:
    """Every file decoded into one uint8 (N, C, H, W) array, allocated once after a memory check; every file
    that cannot be decoded is named in one error."""
    refuse_over(f"{len(paths):,} images of shape {tuple(input_shape)} from {where}",
                len(paths) * math.prod(input_shape), 4, DataError,  # a quarter: the splits are copied once more
                "use a smaller model.input_shape, or fewer images")
    out = np.empty((len(paths), *input_shape), np.uint8)
    bad = []
    for i, f in enumerate(paths):
        try:
            out[i] = decode_image(f, input_shape, resize)
        except ValueError as e:
            bad.append(f"{f}: {e}")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} of {len(paths):,} files in {where} cannot be decoded:\n  {shown}",
                        "remove or replace them (cnnctl reads " + ", ".join(FORMATS) + ")")
    return out
