"""Request bodies to pixels, and what is wrong with a bad one: picture files (multipart parts or a raw body),
a JSON array of pixels, and the Open Inference Protocol's JSON tensors. Every refusal is a `RequestError` with the
HTTP status it answers with and a message that names what was wrong."""

from __future__ import annotations

import io
import math

import numpy as np

from cnnctl.data.pictures import NotAPicture, TooManyPixels, decode_image

MAX_PIXELS = 50_000_000  # per picture, read from its header before it is decoded (a 7000 x 7000 photo passes)
MAX_IMAGES = 256  # per request


class RequestError(Exception):
    """A request the server refuses: `status` (4xx), what was wrong, and the fix when there is one."""

    def __init__(self, status: int, message: str, fix: str | None = None):
        super().__init__(message)
        self.status, self.message, self.fix = status, message, fix

    def body(self) -> dict:
        return {"error": self.message, **({"fix": self.fix} if self.fix else {})}


def _count(n: int) -> None:
    if n == 0:
        raise RequestError(422, "no images in the request", "send picture files, raw picture bytes or pixels")
    if n > MAX_IMAGES:
        raise RequestError(413, f"{n} images in one request, more than {MAX_IMAGES}", "send them in several requests")


def pictures(parts: list[tuple[str, bytes]], input_shape, resize: int | None) -> np.ndarray:
    """Picture files (name, bytes) decoded as `cnnctl predict` decodes files: (N, C, H, W) float32 in 0..1."""
    _count(len(parts))
    out = np.empty((len(parts), *input_shape), np.float32)
    for i, (name, blob) in enumerate(parts):
        if not blob:
            raise RequestError(422, f"{name}: empty, not a picture")
        try:
            out[i] = decode_image(io.BytesIO(blob), input_shape, resize, max_pixels=MAX_PIXELS)
        except NotAPicture as e:
            raise RequestError(415, f"{name}: {e}", "send PNG, JPEG, BMP, GIF or WebP files") from None
        except TooManyPixels as e:
            raise RequestError(413, f"{name}: {e}", "scale the picture down before sending it") from None
        except ValueError as e:
            raise RequestError(415, f"{name}: cannot be decoded ({e})") from None
        out[i] *= np.float32(1 / 255)
    return out


def _array(value, what: str) -> np.ndarray:
    try:
        x = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(422, f"{what} is not a rectangular array of numbers",
                           "every row of an axis must have as many entries as the others, all numbers") from None
    if not np.isfinite(x).all():
        raise RequestError(422, f"{what} holds a value that is not a finite number")
    return x


def pixels(value, input_shape) -> np.ndarray:
    """A JSON array of pixels in 0..1: one image (C, H, W), or (H, W) for a one-channel model, or a batch
    (N, C, H, W)."""
    x = _array(value, "the JSON body")
    c, h, w = input_shape
    if x.ndim == 2 and c == 1:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise RequestError(422, f"pixels of shape {list(x.shape)}: the model takes (N, {c}, {h}, {w}) or ({c}, {h}, "
                                f"{w})", "send one image as C x H x W nested lists, or a batch as N x C x H x W")
    _count(len(x))
    _check_shape(x.shape, input_shape)
    return x.astype(np.float32)


def _check_shape(shape, input_shape) -> None:
    c, h, w = input_shape
    if shape[1] != c:
        raise RequestError(422, f"images with {shape[1]} channels: the model takes {c}",
                           "send grayscale pixels" if c == 1 else f"send {c} channels (RGB)")
    if tuple(shape[2:]) != (h, w):
        raise RequestError(422, f"images of {shape[2]} x {shape[3]} pixels: the model takes {h} x {w}",
                           "resize them, or send picture files (the server resizes those)")


DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT32": np.int32,
             "INT64": np.int64}


def tensor(body, input_shape) -> tuple[str, np.ndarray]:
    """The Open Inference Protocol's infer request: {"inputs": [{"name", "shape": [N, C, H, W], "datatype",
    "data"}]}, pixels in 0..1 (UINT8 as 0..255). Returns the request's id and (N, C, H, W) float32."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise RequestError(422, "an infer request is {\"inputs\": [one tensor]}",
                           "send {\"inputs\": [{\"name\": \"input\", \"shape\": [N, C, H, W], \"datatype\": \"FP32\", "
                           "\"data\": [...]}]}")
    t = body["inputs"][0]
    if not isinstance(t, dict) or not {"shape", "datatype", "data"} <= t.keys():
        raise RequestError(422, "the input tensor needs name, shape, datatype and data")
    if t["datatype"] not in DATATYPES:
        raise RequestError(422, f"datatype {t['datatype']!r} is not one this model takes",
                           f"use one of {', '.join(DATATYPES)}")
    shape = t["shape"]
    if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(422, f"tensor shape {shape!r}: the model takes [N, {', '.join(map(str, input_shape))}]")
    _count(shape[0])
    _check_shape(shape, input_shape)
    data = _array(t["data"], "the tensor's data").ravel()
    if data.size != math.prod(shape):
        raise RequestError(422, f"the tensor's data holds {data.size} values, its shape {shape} needs "
                                f"{math.prod(shape)}")
    x = data.reshape(shape).astype(np.float32)
    if t["datatype"] == "UINT8":
        x *= np.float32(1 / 255)
    return str(body.get("id", "")), x
