"""benchmarks/ablation.py: rows add their overrides cumulatively, finished runs are reused, the table reads them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "ablation.py"


def test_ablation_trains_each_row_once_and_tables_them(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("config: configs/quickstart.yaml\nset: [train.epochs=1, train.test_at_end=true]\n"
                    "seeds: [0]\nrows:\n"
                    "  - name: base\n  - name: no decay\n    set: [optimizer.weight_decay=0]\n"
                    "  - name: smaller rate\n    set: [optimizer.lr=0.001]\n")
    args = [sys.executable, str(SCRIPT), str(spec), "--runs-dir", str(tmp_path / "runs"), "--threads", "1"]
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert first.count("$ ") == 3
    rows = [line for line in first.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| base", "| no decay", "| smaller rate"]
    assert all(r.split(" | ")[3].strip() for r in rows)  # a mean for every row
    cumulative = (tmp_path / "runs").glob("02-smaller-rate-s0-*/config.yaml")
    text = next(cumulative).read_text()
    assert "weight_decay: 0" in text and "lr: 0.001" in text  # row 2 carries row 1's change
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "$ " not in again and again.splitlines()[-3:] == first.splitlines()[-3:]


def test_ablation_config_option_runs_the_rows_on_another_base(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("config: configs/quickstart.yaml\nset: [train.epochs=1, train.test_at_end=true]\n"
                    "seeds: [0]\nrows:\n  - name: base\n")
    other = tmp_path / "other.yaml"
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    assert "lr: 0.003" in text
    other.write_text(text.replace("lr: 0.003", "lr: 0.002"))
    subprocess.run([sys.executable, str(SCRIPT), str(spec), "--config", str(other), "--runs-dir",
                    str(tmp_path / "runs"), "--threads", "1"], capture_output=True, text=True, cwd=ROOT, check=True)
    config = next((tmp_path / "runs").glob("00-base-s0-*/config.yaml")).read_text()
    assert "lr: 0.002" in config and "epochs: 1" in config
