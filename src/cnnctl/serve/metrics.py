"""The server's counts in the Prometheus text format (version 0.0.4): requests by path and status, a latency
histogram, a batch-size histogram and the images served. Written by hand: a few counters need no library."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge:g}"}} {count}' for edge, count in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self, max_batch: int):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status) -> count
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch}))
        self.images = 0

    def request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            self.latency.observe(seconds)

    def batched(self, n: int) -> None:
        with self._lock:
            self.batch.observe(n)
            self.images += n

    def text(self, ready: bool) -> str:
        with self._lock:
            lines = ["# HELP cnnctl_requests_total HTTP requests answered, by path and status.",
                     "# TYPE cnnctl_requests_total counter"]
            lines += [f'cnnctl_requests_total{{path="{path}",status="{status}"}} {n}'
                      for (path, status), n in sorted(self.requests.items())]
            lines += ["# HELP cnnctl_request_seconds Time from a request's arrival to its answer.",
                      "# TYPE cnnctl_request_seconds histogram", *self.latency.lines("cnnctl_request_seconds"),
                      "# HELP cnnctl_batch_images Images per forward pass (dynamic batching).",
                      "# TYPE cnnctl_batch_images histogram", *self.batch.lines("cnnctl_batch_images"),
                      "# HELP cnnctl_images_total Images the model has been run on.",
                      "# TYPE cnnctl_images_total counter", f"cnnctl_images_total {self.images}",
                      "# HELP cnnctl_ready Whether the model is loaded, warmed up and its worker alive.",
                      "# TYPE cnnctl_ready gauge", f"cnnctl_ready {int(ready)}"]
        return "\n".join(lines) + "\n"
