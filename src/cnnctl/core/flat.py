"""Parameters laid end to end, so that an optimizer updates a group of them (the same rate, weight decay, dtype and
kind of state) with one NumPy call per operation instead of one per parameter. Each parameter's array becomes a
view into the group's array (the layers read and checkpoints hold arrays of their own shapes, as before), and so
does each parameter's state; the gradients, which every backward makes anew, are gathered into one array a step.
A layer given new arrays (a checkpoint loaded, a weight average applied) is laid out again at the next step.
Element-wise updates give the same bits whether they run parameter by parameter or over the group at once."""

from __future__ import annotations

import numpy as np


class Flat:
    """One group of parameters (nn.Param) laid end to end, and its state arrays. `state` is the optimizer's
    per-parameter state, {name: {key: array}}: its entries for these parameters become views into the group's."""

    def __init__(self, params: list, state: dict[str, dict[str, np.ndarray]], dtype: np.dtype):
        self.names = tuple(p.name for p in params)
        self.bounds = np.cumsum([0] + [p.value.size for p in params]).tolist()
        self.value = np.concatenate([p.value.ravel() for p in params]).astype(dtype, copy=False)
        self.grad = np.empty_like(self.value)
        self.params = []  # each parameter's array: a view into self.value
        for p, lo, hi in zip(params, self.bounds, self.bounds[1:]):
            v = p.layer.params[p.key] = self.value[lo:hi].reshape(p.value.shape)
            self.params.append(v)
        own = [state.setdefault(name, {}) for name in self.names]
        self.state = {k: np.concatenate([st[k].ravel() for st in own]).astype(dtype, copy=False) for k in own[0]}
        self._view(state)

    def _view(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        self.views = []
        for k, flat in self.state.items():
            for name, p, lo, hi in zip(self.names, self.params, self.bounds, self.bounds[1:]):
                v = state[name][k] = flat[lo:hi].reshape(p.shape)
                self.views.append((name, k, v))

    def current(self, params: list, state: dict[str, dict[str, np.ndarray]]) -> bool:
        """Whether this group still stands for these parameters with this state (nothing replaced an array)."""
        return (tuple(p.name for p in params) == self.names and all(p.value is v for p, v in zip(params, self.params))
                and all(state[name].get(k) is v for name, k, v in self.views)
                and all(len(state[name]) == len(self.state) for name in self.names))

    def gather(self, params: list) -> tuple[np.ndarray, np.ndarray]:
        """The parameters end to end (the model's own values) and a copy of their gradients (free to overwrite)."""
        np.concatenate([p.grad.ravel() for p in params], out=self.grad)
        return self.value, self.grad

    def adopt(self, st: dict[str, np.ndarray], state: dict[str, dict[str, np.ndarray]]) -> None:
        """Take the state an update left in `st` (the group's dict): arrays it replaced or added become the group's,
        and each parameter's entries views into them."""
        if any(self.state.get(k) is not a for k, a in st.items()) or len(st) != len(self.state):
            self.state = {k: np.ascontiguousarray(a, self.value.dtype).reshape(-1) for k, a in st.items()}
            self._view(state)

    def put(self, new: np.ndarray) -> None:
        """The new values, when an update returned them in an array of its own rather than in place."""
        if new is not self.value:
            self.value[...] = new
