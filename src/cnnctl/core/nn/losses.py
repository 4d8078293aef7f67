"""Losses: `value = loss.forward(outputs, targets)` returns a float, `loss.backward()` the output gradient."""

from __future__ import annotations

import numpy as np

from cnnctl.core import functional as F
from cnnctl.registry import registrar

LOSSES: dict[str, type[Loss]] = {}
register_loss = registrar(LOSSES)


class Loss:
    tag = "loss"
    # what the model's outputs must be for this loss: logits (it applies log-softmax itself), log_probabilities
    # (a log_softmax ends the model), or scores (taken as they are); the model checks and predict read it
    takes = "scores"
    # what the last forward divided its sum by (the batch size, or the batch's summed class weights): data-parallel
    # training rescales each part's gradient to the whole batch's normaliser
    normalizer: float = 1.0

    def forward(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        raise NotImplementedError

    def backward(self) -> np.ndarray:
        raise NotImplementedError


def _check_class_targets(outputs, targets):
    targets = np.asarray(targets)
    if targets.shape != (outputs.shape[0],) or targets.dtype.kind not in "iu":
        raise ValueError(f"expected integer class targets of shape ({outputs.shape[0]},), got {targets.shape} "
                         f"{targets.dtype}")
    if targets.size and (targets.min() < 0 or targets.max() >= outputs.shape[1]):
        raise ValueError(f"class targets must lie in [0, {outputs.shape[1]}), got {targets.min()}..{targets.max()}")
    return targets


@register_loss("cross_entropy")
class CrossEntropyLoss(Loss):
    """Softmax + negative log-likelihood on logits (N, K) with integer targets (N,), mean over the batch.

    With label smoothing e the target distribution is (1 - e) * onehot + e / K (PyTorch's definition).
    Computed through log-softmax, so logits of magnitude 1e4 give finite values and gradients.
    """

    takes = "logits"

    def __init__(self, label_smoothing: float = 0.0, class_weights=None):
        self.label_smoothing = float(label_smoothing)
        self.class_weights = None if class_weights is None else np.asarray(class_weights, np.float64)

    def forward(self, outputs, targets):
        targets = _check_class_targets(outputs, targets)
        n, k = outputs.shape
        logp = F.log_softmax(outputs, axis=1)
        e, w = self.label_smoothing, self.class_weights
        if w is None:  # the target distribution, each sample counting 1
            q = np.full_like(outputs, e / k)
            q[np.arange(n), targets] += 1.0 - e
            total = n
        else:
            if len(w) != k:
                raise ValueError(f"{len(w)} class weights for {k} outputs")
            # PyTorch's weighted form: the true class's term weighted by its class's weight, the smoothing
            # term by each class's own, normalised by the summed weights of the batch's true classes
            ww = w.astype(outputs.dtype)
            q = np.broadcast_to(ww * (e / k), outputs.shape).copy()
            q[np.arange(n), targets] += (1.0 - e) * ww[targets]
            total = float(w[targets].sum())
        self._probs, self._q, self._total = np.exp(logp), q, total
        self.normalizer = float(total)
        return float(-(q * logp).sum() / total)

    def backward(self):
        p, q = self._probs, self._q
        if self.class_weights is None:
            return (p - q) / self._total
        return (p * q.sum(axis=1, keepdims=True) - q) / self._total


@register_loss("mse")
class MSELoss(Loss):
    """E = 1/2 * sum_k (t_k - o_k)^2 per sample, averaged over the batch (the 1/2 of the backprop
    derivation, so dE/do = o - t; this is half of PyTorch's MSELoss(reduction='sum') / N).

    Integer class targets (N,) with outputs (N, K) are one-hot encoded first.
    """

    def forward(self, outputs, targets):
        targets = np.asarray(targets)
        if targets.ndim == 1 and outputs.ndim == 2 and targets.dtype.kind in "iu":
            targets = np.eye(outputs.shape[1], dtype=outputs.dtype)[_check_class_targets(outputs, targets)]
        if targets.shape != outputs.shape:
            raise ValueError(f"mse targets must have the outputs' shape {outputs.shape}, got {targets.shape}")
        self._diff = outputs - targets.astype(outputs.dtype)
        self.normalizer = float(outputs.shape[0])
        return float(0.5 * (self._diff**2).sum() / outputs.shape[0])

    def backward(self):
        return self._diff / self._diff.shape[0]


@register_loss("nll")
class NLLLoss(Loss):
    """Negative log-likelihood of log-probabilities (N, K) (a log_softmax layer's output) with integer targets
    (N,): -mean(outputs[i, target_i]), PyTorch's nll_loss. log_softmax + nll equals cross_entropy on logits."""

    takes = "log_probabilities"

    def forward(self, outputs, targets):
        targets = _check_class_targets(outputs, targets)
        n = outputs.shape[0]
        self._shape, self._targets, self.normalizer = outputs.shape, targets, float(n)
        self._dtype = outputs.dtype
        return float(-outputs[np.arange(n), targets].sum(dtype=np.float64) / max(n, 1))

    def backward(self):
        grad = np.zeros(self._shape, self._dtype)
        n = self._shape[0]
        grad[np.arange(n), self._targets] = -1.0 / max(n, 1)
        return grad


@register_loss("bce_with_logits")
class BCEWithLogitsLoss(Loss):
    """Multi-label: a sigmoid and binary cross-entropy per output, on logits (N, K) with 0/1 targets (N, K) (one
    column per label, any number of them set), mean over all N * K terms: PyTorch's BCEWithLogitsLoss.

    With pos_weight p (per label) the positive term is weighted: l = p * t * softplus(-z) + (1 - t) * softplus(z),
    dl/dz = sigmoid(z) * (p * t + 1 - t) - p * t. Through softplus, logits of any magnitude stay finite.
    """

    takes = "label_logits"

    def __init__(self, pos_weight=None):
        self.pos_weight = None if pos_weight is None else np.asarray(pos_weight, np.float64)

    def forward(self, outputs, targets):
        targets = np.asarray(targets)
        if targets.shape != outputs.shape:
            raise ValueError(f"multi-label targets must have the outputs' shape {outputs.shape} (one 0/1 column per "
                             f"label), got {targets.shape}")
        if self.pos_weight is not None and len(self.pos_weight) != outputs.shape[1]:
            raise ValueError(f"{len(self.pos_weight)} pos_weight values for {outputs.shape[1]} outputs")
        t = targets.astype(outputs.dtype)
        p = 1.0 if self.pos_weight is None else self.pos_weight.astype(outputs.dtype)
        positive = p * t  # the weight of each term's positive part
        negative = 1 - t
        terms = positive * F.softplus(-outputs) + negative * F.softplus(outputs)
        self._sig, self._positive, self._negative = F.sigmoid(outputs), positive, negative
        self.normalizer = float(outputs.size)
        return float(terms.sum(dtype=np.float64) / max(outputs.size, 1))

    def backward(self):
        g = self._sig * (self._positive + self._negative)
        g -= self._positive
        g /= max(self.normalizer, 1.0)
        return g
