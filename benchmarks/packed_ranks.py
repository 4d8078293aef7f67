"""What each MPI rank reads of a packed dataset: one process against N ranks training the same run.

    python benchmarks/packed_ranks.py --data ../shared/data/mnist [--size 224 --base 3125] [--ranks 2] [--work DIR]

Packs MNIST as benchmarks/packed_memory.py does (--size 224: enlarged to 3 x 224 x 224, 150,528 bytes an image,
with its small strided network), then trains one epoch with its test at the end, once as one process and once
as `mpiexec -n N ... --threads 1`. Each process counts, inside cnnctl, the bytes of the pack it reads: rows
gathered from the memory-mapped shards (training and evaluation batches, normalize: auto's sums) and files
hashed against the manifest; /proc/self/io's rchar (every byte read through read(), Python's own files
included) is given beside them. The runs' test accuracies must be equal (N ranks train the model one process
trains).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(argv: list[str]) -> None:
    """cnnctl's CLI with argv, counting the pack's bytes this process reads; one JSON line at exit."""
    import atexit

    from cnnctl.data import packed

    counts = {"rows_bytes": 0, "hashed_bytes": 0}
    gather, sha = packed.Rows.__getitem__, packed._sha256

    def counted_rows(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        n = 1 if isinstance(rows, (int,)) else len(self._rows(rows))
        counts["rows_bytes"] += n * int(self.parts[0][0].nbytes if self.parts else 0)
        return gather(self, key)

    def counted_sha(path):
        counts["hashed_bytes"] += Path(path).stat().st_size
        return sha(path)

    packed.Rows.__getitem__, packed._sha256 = counted_rows, counted_sha

    def report():
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
        print("READ " + json.dumps({"rank": rank, **counts, "rchar": int(io["rchar"])}), flush=True)

    atexit.register(report)
    from cnnctl.cli import app

    app(argv, standalone_mode=True)


def run(cmd: list[str]) -> list[dict]:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    return sorted((json.loads(line[5:]) for line in res.stdout.splitlines() if line.startswith("READ ")),
                  key=lambda r: r["rank"])


def main() -> None:
    import packed_memory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/mnist")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--base", type=int, default=3125)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", type=Path)
    a = p.parse_args()
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install 'cnnctl[mpi]' (or a system MPI)")
    work = a.work or Path(tempfile.mkdtemp(prefix="packed-ranks-"))
    work.mkdir(parents=True, exist_ok=True)
    pack = work / f"pack-{a.size}-{a.base}-x1"  # as packed_memory.py names it: one --work serves both
    packed_memory.make_pack(packed_memory.source(a.data, a.size, a.base), 1, pack)
    config = work / f"packed-{a.size}.yaml"
    config.write_text(packed_memory.SMALL_224.replace("224", str(a.size)).replace("test_at_end: false",
                                                                                  "test_at_end: true"))
    sets = ["--set", "data.dataset=packed", "--set", f"data.path={pack}", "-q"]
    me = [sys.executable, __file__, "--worker", "train", str(config), *sets]
    one = run([*me, "--runs-dir", str(work / "one")])
    many = run([mpiexec, "-n", str(a.ranks), *me, "--runs-dir", str(work / "many"), "--threads", "1"])
    accuracy = [json.loads((max((work / d).iterdir(), key=os.path.getmtime) / "summary.json").read_text())["test"]
                ["accuracy"] for d in ("one", "many")]
    total = sum(f.stat().st_size for f in pack.glob("*.npy"))
    print(f"{time.strftime('%Y-%m-%d')}, 3 x {a.size} x {a.size}, pack {total / 1e6:,.0f} MB; test accuracy: one "
          f"process {100 * accuracy[0]:.2f}%, {a.ranks} ranks {100 * accuracy[1]:.2f}%")
    print("| processes | rank | rows gathered (MB) | files hashed (MB) | pack bytes read / pack size | rchar (MB) |")
    print("|---|---|---|---|---|---|")
    for label, rows in (("1", one), (f"{a.ranks} (mpiexec)", many)):
        for r in rows:
            read = r["rows_bytes"] + r["hashed_bytes"]
            print(f"| {label} | {r['rank']} | {r['rows_bytes'] / 1e6:,.0f} | {r['hashed_bytes'] / 1e6:,.0f} | "
                  f"{read / total:.2f} | {r['rchar'] / 1e6:,.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
