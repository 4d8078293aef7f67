"""`shapes`: a procedurally generated image set that needs no download.

Each image holds one shape (circle, square, triangle, cross, ring, bar) at a random position, size,
rotation and brightness over Gaussian noise. Positions vary, so the task rewards convolution. Everything is
drawn from the Generator passed in, so the same seed gives the same images. Rendering is vectorised over all
images of a class at once.
"""

from __future__ import annotations

import numpy as np

from cnnctl.core.memory import refuse_over
from cnnctl.errors import DataError

from .formats import Raw, register_format


def _inside(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of points (u, v), in units of the shape's radius, that lie inside the shape."""
    au, av = np.abs(u), np.abs(v)
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":
        return np.maximum(au, av) <= 0.8
    if kind == "triangle":
        return (v >= -0.5) & (np.sqrt(3.0) * au + v <= 1.0)
    if kind == "cross":
        return ((au <= 0.25) & (av <= 1.0)) | ((av <= 0.25) & (au <= 1.0))
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.45)
    if kind == "bar":
        return (au <= 1.0) & (av <= 0.3)
    raise ValueError(f"unknown shape {kind!r}")


def bytes_needed(n: int, n_kinds: int, shape: tuple[int, int, int]) -> int:
    """Peak memory of generate(n, ...): the uint8 images plus one kind's float temporaries (about five arrays)."""
    c, h, w = shape
    return n * c * h * w + 5 * 8 * -(-n // n_kinds) * c * h * w


def generate(n: int, kinds: list[str], shape: tuple[int, int, int], noise: float, rng: np.random.Generator):
    """n images (uint8, (n, C, H, W)) with balanced labels (int64) in random order."""
    c, h, w = shape
    labels = rng.permutation(np.arange(n) % len(kinds))
    images = np.empty((n, c, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(h, w)
    for k, kind in enumerate(kinds):
        idx = np.flatnonzero(labels == k)
        m = len(idx)
        radius = rng.uniform(0.22, 0.4, m) * side
        cy = rng.uniform(radius, h - radius)
        cx = rng.uniform(radius, w - radius)
        theta = rng.uniform(0, 2 * np.pi, m)
        dy = (yy[None] - cy[:, None, None]) / radius[:, None, None]
        dx = (xx[None] - cx[:, None, None]) / radius[:, None, None]
        cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        mask = _inside(kind, cos * dx + sin * dy, -sin * dx + cos * dy)  # (m, H, W)
        color = rng.uniform(0.6, 1.0, (m, c)) if c > 1 else rng.uniform(0.6, 1.0, (m, 1))
        img = mask[:, None].astype(np.float32) * color[:, :, None, None].astype(np.float32)
        img += rng.normal(0.0, noise, img.shape).astype(np.float32)
        images[idx] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@register_format("shapes", "generated shapes (circle, square, ...) on noise, any input size, no download",
                 located_by="nothing", classes=lambda spec: list(spec.shapes.kinds))
def load(spec, input_shape, rng, progress) -> Raw:
    o = spec.shapes
    refuse_over(f"the shapes data at input_shape {list(input_shape)}",  # at most half the memory
                bytes_needed(max(o.train_size, o.test_size), len(o.kinds), tuple(input_shape)), 2,
                DataError, "use a smaller model.input_shape or data.shapes.train_size / test_size")
    train = generate(o.train_size, list(o.kinds), tuple(input_shape), o.noise, rng)
    test = generate(o.test_size, list(o.kinds), tuple(input_shape), o.noise, rng)
    return Raw(list(o.kinds), train, test)
