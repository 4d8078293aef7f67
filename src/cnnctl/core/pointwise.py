"""Element-wise and per-row math outside the convolutions: max(x, 0) (for ReLU), erf (for GELU), sigmoid and
softplus, softmax and log-softmax, a model's outputs as probabilities, and pixels normalised as a checkpoint says.
(cnnctl.core.functional re-exports them.)"""

from __future__ import annotations

import numpy as np

CONSTANT_CAP = 1 << 20  # values of the largest array of a constant kept per dtype and value (4 MB of float32, touched
# only as used)
_constants: dict[tuple, np.ndarray] = {}


def maximum_zero(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """np.maximum(x, 0, out=out), the same bits (NaN kept, -0 and -inf to 0), against an array of zeros shaped like
    x: NumPy's maximum loop with a scalar operand ran 2-2.7x slower than with an array one (numpy 2.4.6, AVX-512:
    2 million float32 values 0.74 ms against 0.37 in tiles of 65,536; a convolution's rows in place 0.20 against
    0.07 ms). An x over CONSTANT_CAP values runs in blocks of its leading axis; `out` may be x."""
    return against_constant(np.maximum, x, 0.0, out)


def against_constant(ufunc, x: np.ndarray, value: float, out: np.ndarray) -> np.ndarray:
    """ufunc(x, value, out=out) (np.maximum or np.minimum), the same bits, against a kept read-only array of the
    value shaped like x rather than the scalar (see maximum_zero)."""
    if x.size > CONSTANT_CAP:
        row = x[0].size if x.ndim > 1 else 1
        if x.ndim < 2 or row > CONSTANT_CAP:
            return ufunc(x, x.dtype.type(value), out=out)
        step = CONSTANT_CAP // row
        for lo in range(0, x.shape[0], step):
            against_constant(ufunc, x[lo : lo + step], value, out[lo : lo + step])
        return out
    key = (x.dtype.str, float(value))
    constant = _constants.get(key)
    if constant is None:  # made once per dtype and value; two threads making it at once make two equal arrays
        # zeros from calloc's untouched pages (np.full would write all of them now)
        constant = np.full(CONSTANT_CAP, value, x.dtype) if value else np.zeros(CONSTANT_CAP, x.dtype)
        constant.flags.writeable = False
        constant = _constants.setdefault(key, constant)
    return ufunc(x, constant[: x.size].reshape(x.shape), out=out)


ERF_32 = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # Abramowitz and Stegun 7.1.26
ERF_32_P = 0.3275911
# the normal tail Q(|x|) = (1 - erf(|x| / sqrt 2)) / 2 = poly(t) * pdf(x): 7.1.26's coefficients times sqrt(pi / 2)
NORMAL_TAIL = tuple(np.float32(c * np.sqrt(np.pi / 2)) for c in ERF_32)
LOG_DENSITY = np.float32(-0.5 * np.log(2 * np.pi))  # log of the normal density at 0


def normal_cdf_and_density(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Phi(x), phi(x)): the standard normal distribution function and density, as GELU takes them. Float32 by
    Abramowitz and Stegun 7.1.26, whose tail needs the density: its coefficients carry the factor between erf and
    Phi, the density's constant sits in the exponent, and the sign comes from x's bits, so that both cost 23
    passes (Phi within 2.6e-7 of its float64 values from -12 to 12; tested). Other dtypes through `erf`."""
    if x.dtype != np.float32:
        z = x * x.dtype.type(1 / np.sqrt(2.0))
        cdf = erf(z)
        cdf += 1
        cdf *= x.dtype.type(0.5)
        z *= z
        np.negative(z, out=z)
        pdf = np.exp(z, out=z)
        pdf *= x.dtype.type(1 / np.sqrt(2 * np.pi))
        return cdf, pdf
    z = np.multiply(x, np.float32(1 / np.sqrt(2.0)))
    t = np.abs(z)
    t *= np.float32(ERF_32_P)
    t += 1
    np.divide(np.float32(1), t, out=t)  # np.reciprocal's bits in half its time (numpy 2.4.6)
    tail = np.multiply(t, NORMAL_TAIL[-1])
    for c in NORMAL_TAIL[-2::-1]:
        tail += c
        tail *= t
    np.multiply(z, z, out=z)
    np.subtract(LOG_DENSITY, z, out=z)
    pdf = np.exp(z, out=z)
    tail *= pdf  # Q(|x|)
    np.subtract(np.float32(0.5), tail, out=tail)  # Phi(|x|) - 1/2, then its sign made x's (np.copysign: 36 us
    signs = t.view(np.int32)  # for 65,536 values, these two integer passes 18)
    np.bitwise_and(x.view(np.int32), np.int32(-0x80000000), out=signs)
    np.bitwise_or(tail.view(np.int32), signs, out=tail.view(np.int32))
    tail += np.float32(0.5)
    return tail, pdf


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise (NumPy has none). Float32 inputs: 2 Phi(x sqrt 2) - 1, Phi by
    `normal_cdf_and_density` (Abramowitz and Stegun 7.1.26: within 1.5e-7 of erf), computed in float32: within
    6e-7 of erf (a few float32 units at 1; tested). Anything else in float64 to about 1e-14:
    its Taylor series for |x| <= 2.5 (40 terms) and the continued fraction of erfc beyond (40 levels,
    evaluated from the bottom)."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        cdf = normal_cdf_and_density(x * np.float32(np.sqrt(2.0)))[0]
        cdf *= np.float32(2)
        cdf -= np.float32(1)
        return cdf
    x = np.asarray(x, np.float64)
    a = np.abs(x)
    out = np.empty_like(a)
    near = a <= 2.5
    xs = a[near]
    term, total, x2 = xs.copy(), xs.copy(), xs * xs
    for n in range(1, 40):  # terms of the series, each one vectorised pass
        term *= -x2 / n
        total += term / (2 * n + 1)
    out[near] = (2 / np.sqrt(np.pi)) * total
    xl = a[~near]
    f = xl.copy()
    for k in range(40, 0, -1):  # erfc(x) = exp(-x^2) / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / ...)))
        f = xl + (k / 2) / f
    out[~near] = 1 - np.exp(-xl * xl) / np.sqrt(np.pi) / f
    return np.copysign(out, x)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def probabilities(outputs: np.ndarray, takes: str) -> np.ndarray:
    """Class probabilities from a model's outputs (N, classes), by what its loss takes: the softmax of
    logits, the exponential of log-probabilities; scores as they are. Multi-label logits (label_logits): each
    label's own probability, the sigmoid (they need not sum to 1)."""
    if takes == "logits":
        return softmax(outputs, axis=1)
    if takes == "label_logits":
        return sigmoid(outputs)
    return np.exp(outputs) if takes == "log_probabilities" else outputs


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) as (1 + tanh(x / 2)) / 2: no overflow anywhere, three passes."""
    half = x.dtype.type(0.5)
    s = np.tanh(x * half)
    s += 1
    s *= half
    return s


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), finite for any x: np.logaddexp(0, x)'s formula in NumPy's
    vectorised exp and log1p (logaddexp's own loop, one value at a time, took 10x as long on float32: 866 against
    84 us for 65,536 values; within 4 units in the last place of it, 3 measured)."""
    a = np.abs(x)
    np.negative(a, out=a)
    np.exp(a, out=a)
    np.log1p(a, out=a)
    out = maximum_zero(x, np.empty_like(x))
    out += a
    return out


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax (exact for logits of any magnitude)."""
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def normalize(x01: np.ndarray, normalization: dict) -> np.ndarray:
    """Pixels on the 0..1 scale -> the model's input, with the checkpoint's mean and std."""
    mean = np.asarray(normalization.get("mean", [0.0]), np.float32)[None, :, None, None]
    std = np.asarray(normalization.get("std", [1.0]), np.float32)[None, :, None, None]
    return ((x01 - mean) / std).astype(np.float32)
