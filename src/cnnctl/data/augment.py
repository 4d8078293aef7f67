"""Training-batch augmentation, vectorised over the batch and drawn from the run's Generator.

Works on the stored pixels (uint8 or float) before normalisation, so padding is black (0). Every draw is made for
the whole batch; `part` = (lo, hi, n) says that x holds only rows lo:hi of a batch of n (an MPI rank's share): the
same numbers are drawn, and those rows' are used, so a rank's rows are augmented as one process augments them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def _rows(x: np.ndarray, part) -> tuple[int, slice]:
    """(the batch's size, x's rows of it) for `part` (None: x is the whole batch)."""
    return (len(x), slice(None)) if part is None else (part[2], slice(part[0], part[1]))


def _gather(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """out[n, c, i, j] = x[n, c, rows[n, i], cols[n, j]] for per-sample row and column indices."""
    n = np.arange(len(x))[:, None, None]
    return x[n, :, rows[:, :, None], cols[:, None, :]].transpose(0, 3, 1, 2)


def _edge_clipped(size: int, offset) -> np.ndarray:
    """Indices of a shift by `offset` (a number, or a column of per-sample numbers) that repeat the edge."""
    return np.clip(np.arange(size) - offset, 0, size - 1)


def random_crop(x: np.ndarray, padding: int, rng: np.random.Generator, part=None) -> np.ndarray:
    """Pad by `padding` zeros on every side, then crop back to (H, W) at a random offset per sample."""
    (n, mine), (_, _, h, w) = _rows(x, part), x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oy, ox = rng.integers(0, 2 * padding + 1, (2, n))[:, mine]
    return _gather(xp, oy[:, None] + np.arange(h), ox[:, None] + np.arange(w))


def random_shift(x: np.ndarray, fraction: float, rng: np.random.Generator, part=None) -> np.ndarray:
    """Shift each sample by up to fraction x size in each direction, repeating the edge pixels."""
    (n, mine), (_, _, h, w) = _rows(x, part), x.shape
    dy = rng.integers(-int(fraction * h), int(fraction * h) + 1, n)[mine]
    dx = rng.integers(-int(fraction * w), int(fraction * w) + 1, n)[mine]
    return _gather(x, _edge_clipped(h, dy[:, None]), _edge_clipped(w, dx[:, None]))


def shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Every sample moved dy rows down and dx columns right (negative: up, left), repeating the edge pixels."""
    h, w = x.shape[-2:]
    return np.ascontiguousarray(x[..., _edge_clipped(h, dy)[:, None], _edge_clipped(w, dx)])


def test_time_views(x: np.ndarray, spec) -> Iterator[np.ndarray]:
    """The views a TestTimeAugmentSpec asks for, the batch itself first: each shift of it, and with
    horizontal_flip the mirror of every one. Works on normalised batches too (nothing is padded with 0)."""
    for dy, dx in [(0, 0), *spec.shifts]:
        view = x if dy == dx == 0 else shift(x, dy, dx)
        yield view
        if spec.horizontal_flip:
            yield np.ascontiguousarray(view[..., ::-1])


def horizontal_flip(x: np.ndarray, rng: np.random.Generator, flip: np.ndarray | None = None,
                    part=None) -> np.ndarray:
    """Mirror a random half of the samples left to right (or those `flip` says: x's own rows)."""
    n, mine = _rows(x, part)
    flip = (rng.random(n) < 0.5)[mine] if flip is None else flip
    out = x.copy()
    out[flip] = x[flip, :, :, ::-1]
    return out


def alternating_flips(n: int, seed: int, epoch: int) -> np.ndarray:
    """Which of n training images are mirrored in this epoch (1-based) under alternating flip: a fixed random
    half in odd epochs, the other half in even ones. A function of the seed alone: nothing to checkpoint."""
    first = np.random.default_rng([seed, 0xF1]).random(n) < 0.5
    return first if epoch % 2 else ~first


def random_erasing(x: np.ndarray, p: float, rng: np.random.Generator, area=(0.02, 0.33),
                   aspect=(0.3, 3.3), part=None) -> np.ndarray:
    """With probability p per sample, set one rectangle of every channel to 0 (Zhong et al. 2017): its area a
    uniform fraction `area` of the image, its aspect ratio (height / width) log-uniform in `aspect`, its sides
    clipped to the image, its position uniform. Every sample draws the same numbers whether erased or not."""
    (n, mine), (_, _, h, w) = _rows(x, part), x.shape
    erase = (rng.random(n) < p)[mine]
    size = h * w * rng.uniform(*area, n)
    ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]), n))
    eh = np.clip(np.rint(np.sqrt(size * ratio)), 1, h).astype(np.int64)
    ew = np.clip(np.rint(np.sqrt(size / ratio)), 1, w).astype(np.int64)
    top = (rng.random(n) * (h - eh + 1)).astype(np.int64)[mine]
    left = (rng.random(n) * (w - ew + 1)).astype(np.int64)[mine]
    eh, ew = eh[mine], ew[mine]
    rows, cols = np.arange(h), np.arange(w)
    inside = (((rows >= top[:, None]) & (rows < (top + eh)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + ew)[:, None]))[:, None, :])
    inside &= erase[:, None, None]
    return np.where(inside[:, None], x.dtype.type(0), x)


def resized_crop_boxes(n: int, h: int, w: int, scale, ratio, rng: np.random.Generator, tries: int = 10):
    """(top, left, height, width) of n random crops, as torchvision's RandomResizedCrop draws them: an area
    fraction uniform in `scale`, an aspect ratio (width / height) log-uniform in `ratio`, up to `tries` draws per
    image until the box fits; an image whose draws all fail gets the whole image, its aspect clamped to `ratio`."""
    area = h * w * rng.uniform(scale[0], scale[1], (n, tries))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, tries)))
    bw, bh = np.rint(np.sqrt(area * aspect)).astype(np.int64), np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    ok = fits[rows, first]
    bh, bw = np.where(ok, bh[rows, first], 0), np.where(ok, bw[rows, first], 0)
    whole = w / h  # the fallback: the largest centred box within the ratio range
    fh, fw = (h, int(round(h * ratio[1]))) if whole > ratio[1] else \
        (int(round(w / ratio[0])), w) if whole < ratio[0] else (h, w)
    bh, bw = np.where(ok, bh, fh), np.where(ok, bw, fw)
    u = rng.random((2, n))  # the position, drawn for every image (the stream does not depend on the fallback)
    top = np.where(ok, (u[0] * (h - bh + 1)).astype(np.int64), (h - fh) // 2)
    left = np.where(ok, (u[1] * (w - bw + 1)).astype(np.int64), (w - fw) // 2)
    return top, left, bh, bw


def resized_crop(x: np.ndarray, top, left, bh, bw) -> np.ndarray:
    """Each image's box resized back to the image's size, bilinearly (half-pixel centres, as align_corners
    false), all images at once; uint8 images stay uint8 (rounded)."""
    n, c, h, w = x.shape
    ys = top[:, None] + (np.arange(h) + 0.5)[None, :] * (bh[:, None] / h) - 0.5  # (n, h) source rows
    xs = left[:, None] + (np.arange(w) + 0.5)[None, :] * (bw[:, None] / w) - 0.5
    ys = np.clip(ys, top[:, None], (top + bh - 1)[:, None])  # the crop's own edge pixels repeat, as when the crop
    xs = np.clip(xs, left[:, None], (left + bw - 1)[:, None])  # is cut out first and then resized
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, (top + bh - 1)[:, None]), np.minimum(x0 + 1, (left + bw - 1)[:, None])
    wy, wx = (ys - y0)[:, :, None, None], (xs - x0)[:, None, :, None]  # (n, h, 1, 1), (n, 1, w, 1)
    img = x.transpose(0, 2, 3, 1).astype(np.float32)  # (n, h, w, c)
    i = np.arange(n)[:, None, None]

    def at(rows, cols):
        return img[i, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)

    top_row = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom_row = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    out = (top_row * (1 - wy) + bottom_row * wy).transpose(0, 3, 1, 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if x.dtype == np.uint8 else out.astype(x.dtype)


def random_resized_crop(x: np.ndarray, spec, rng: np.random.Generator, part=None) -> np.ndarray:
    (n, mine), (_, _, h, w) = _rows(x, part), x.shape
    return resized_crop(x, *(a[mine] for a in resized_crop_boxes(n, h, w, spec.scale, spec.ratio, rng)))


def apply(x: np.ndarray, spec, rng: np.random.Generator, flips: np.ndarray | None = None,
          part: tuple[int, int, int] | None = None) -> np.ndarray:
    """The augmentations a DataSpec.augment asks for, in a fixed order: resized crop, crop, shift, flip,
    erasing. With alternating flip, `flips` says which images of x are mirrored. `part`: see the module."""
    if spec.random_resized_crop is not None:
        x = random_resized_crop(x, spec.random_resized_crop, rng, part)
    if spec.random_crop:
        x = random_crop(x, spec.random_crop, rng, part)
    if spec.random_shift:
        x = random_shift(x, spec.random_shift, rng, part)
    if spec.horizontal_flip == "alternating":
        x = horizontal_flip(x, rng, flips, part)
    elif spec.horizontal_flip:
        x = horizontal_flip(x, rng, part=part)
    if spec.random_erasing:
        x = random_erasing(x, spec.random_erasing, rng, part=part)
    return x
