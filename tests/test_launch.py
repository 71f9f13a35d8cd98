"""The launchers without a scheduler: local.sh, and launch.sweep's grid and table."""

import json
import subprocess
import sys

from conftest import ROOT, run_env, run_module
from launch import sweep


def test_local_launcher_runs_n_ranks(mnist_h5, tmp_path):
    env = run_env()
    env["DISTNN_PYTHON"] = sys.executable
    result = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "3", "--data",
                             str(mnist_h5), "--out", str(tmp_path), "--train-limit", "300",
                             "--val-size", "0", "--epochs", "1", "--layers", "784,8,10"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 3


def test_grid_and_collected_table(tmp_path):
    grid = sweep.write_grid(tmp_path, [0.1, 1.0], [10, 100])
    assert grid == [(0.1, 10), (0.1, 100), (1.0, 10), (1.0, 100)]
    for task, acc in ((0, 0.91), (2, 0.95)):
        (tmp_path / f"task-{task}").mkdir()
        (tmp_path / f"task-{task}" / "summary.json").write_text(json.dumps(
            {"test_acc": acc, "val_acc": acc - 0.01, "train_loss": 0.3, "epochs": 2, "steps": 40}))
    (tmp_path / "task-3" / "checkpoints").mkdir(parents=True)
    table = sweep.collect(tmp_path)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == ["2", "0", "1", "3"]
    assert rows[0][3] == "0.9500" and rows[1][3] == "0.9100"
    assert rows[2][-1].strip(" |") == "missing" and rows[3][-1].strip(" |") == "unfinished"
    assert (tmp_path / "results.csv").read_text().splitlines()[1].startswith("2,1.0,10,0.95")


def test_sweep_errors_are_one_line(tmp_path):
    def run(*args):
        return run_module("launch.sweep", *args, timeout=60)
    missing = run("collect", tmp_path)
    assert missing.returncode == 2 and "no grid.tsv" in missing.stderr
    sweep.write_grid(tmp_path / "s", [0.1], [10])
    again = run("submit", tmp_path / "s", "--lr", "0.1")
    assert again.returncode == 2 and "already holds a sweep" in again.stderr
    bad = run("submit", tmp_path / "t", "--lr", "fast")
    assert bad.returncode == 2 and "not a comma-separated list" in bad.stderr
    for result in (missing, again, bad):
        assert "Traceback" not in result.stderr
