"""`cnnctl serve` under load: requests/s and latency on loopback, and resident memory across many requests.

    python benchmarks/serve_load.py RUN_DIR [RUN_DIR ...] [--requests 2000] [--concurrency 1 8 32]
        [--memory-requests 10000] [--threads N] [--json]

For each run: a server started as its own process (`cnnctl serve RUN --port P`), then for each concurrency a
fixed number of POST /predict requests of one of the run's test pictures (a PNG written from its own data), each
in-flight request its own connection of an httpx client; requests/s, p50 and p99 latency and failed requests,
with dynamic batching (--max-batch 32, --max-wait-ms 5) and without (--max-batch 1). Then --memory-requests more
requests at concurrency 8 and the server's resident memory (VmRSS) before and after them. The tests use
`start`, `ready` and `load` on a small model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(target: Path, *options: str, port: int | None = None, env: dict | None = None):
    """(process, base URL) of `cnnctl serve TARGET` on a free loopback port; wait with `ready`."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnctl", "serve", str(target), "--port", str(port), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def ready(proc, url: str, timeout: float = 60.0) -> None:
    """Wait until GET /v2/health/ready answers 200 (raise with the server's output if it exits first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stdout.read()} {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def load(url: str, body: bytes, content_type: str, requests: int, concurrency: int) -> dict:
    """`requests` POST /predict of body, `concurrency` at a time (threads, one client each): requests/s, p50 and
    p99 latency (ms), and the failed requests (not 200, or no answer)."""
    latencies, failures, lock = [], [], threading.Lock()
    left = iter(range(requests))

    def worker():
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                start_ = time.perf_counter()
                try:
                    r = client.post(f"{url}/predict", content=body, headers={"content-type": content_type})
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    ok, r = False, e
                with lock:
                    latencies.append(time.perf_counter() - start_)
                    if not ok:
                        failures.append(str(getattr(r, "text", r))[:200])

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"requests": requests, "concurrency": concurrency, "requests_per_s": requests / seconds,
            "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98], "failed": len(failures), "failures": failures[:5]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def picture(run: Path) -> bytes:
    """A PNG of the first test image of the run's own data, as a client would send it."""
    from PIL import Image

    from cnnctl import api
    from cnnctl.run.start import data_as_run

    spec = api.load(run).spec
    ds = data_as_run(spec)
    x = (ds.test if len(ds.test) else ds.val).x[0]
    buf = io.BytesIO()
    Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()


def measure(run: Path, requests: int, concurrency: list[int], memory_requests: int, threads: int | None) -> dict:
    body = picture(run)
    extra = ["--threads", str(threads)] if threads else []
    out = {"run": str(run), "rows": []}
    for max_batch in (32, 1):
        proc, url = start(run, "--max-batch", str(max_batch), "--max-wait-ms", "5", *extra)
        try:
            ready(proc, url)
            load(url, body, "image/png", 50, 4)  # warm
            for c in concurrency:
                out["rows"].append({"max_batch": max_batch, **load(url, body, "image/png", requests, c)})
            if max_batch == 32 and memory_requests:
                before = rss_mb(proc.pid)
                res = load(url, body, "image/png", memory_requests, 8)
                out["memory"] = {"requests": memory_requests, "rss_before_mb": before,
                                 "rss_after_mb": rss_mb(proc.pid), "failed": res["failed"]}
        finally:
            proc.terminate()
            proc.wait(60)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--memory-requests", type=int, default=10000)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    results = [measure(r, a.requests, a.concurrency, a.memory_requests, a.threads) for r in a.runs]
    if a.json:
        print(json.dumps(results, indent=1))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print("| run | --max-batch | concurrency | requests/s | p50 (ms) | p99 (ms) | failed |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            print(f"| {Path(res['run']).name} | {r['max_batch']} | {r['concurrency']} | {r['requests_per_s']:.0f} | "
                  f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} |")
    for res in results:
        m = res.get("memory")
        if m:
            print(f"{Path(res['run']).name}: VmRSS {m['rss_before_mb']:.0f} MB before {m['requests']:,} requests, "
                  f"{m['rss_after_mb']:.0f} MB after ({100 * (m['rss_after_mb'] / m['rss_before_mb'] - 1):+.1f}%), "
                  f"{m['failed']} failed")


if __name__ == "__main__":
    main()
