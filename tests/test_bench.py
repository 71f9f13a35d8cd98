"""The benchmark runs end to end in a tiny configuration (no speed is asserted): its runs,
the 2-rank Allreduce over shared memory and over TCP, and the scaling model's tables."""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_module


def test_bench_writes_its_table(mnist_h5, tmp_path):
    out = tmp_path / "bench"
    result = run_module("distnn.bench", "--data", mnist_h5, "--layers", "784,8,10",
                        "--batch-size", "32", "--ranks", "1,2", "--steps", "4",
                        "--window", "2", "--repeats", "1", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    ceiling = [(2, False, True)] if len(os.sched_getaffinity(0)) >= 2 else []
    assert [(r["ranks"], r["stream"], r["independent"]) for r in report["runs"]] == \
        [(1, False, False), (2, False, False)] + ceiling + [(1, True, False)]
    for run in report["runs"]:
        assert run["samples_per_s"] > 0 and run["peak_rss_mb"] > 0
        assert (run["allreduce_bytes_per_step"] > 0) != run["independent"]
        assert {"data_ms", "compute_ms", "comm_ms"} <= set(run)
    assert report["plain_samples_per_s"] > 0 and report["exact_vs_plain"] > 0
    assert report["gemm_gflops"]["float32"] > 0 and report["bound_samples_per_s"] > 0
    allreduce = report["allreduce"]
    # per step: the grids (4 exponents and a flag), the gradients, the stop signal
    grads = report["runs"][0]["allreduce_bytes_per_step"] - 8 * allreduce["small"] - 8
    # the median in-process batch's gradient buffer (batches differ in the pixel columns used)
    assert allreduce["count"] * 8 == pytest.approx(grads, rel=0.1) and allreduce["small"] == 5
    assert allreduce["shm"]["over_tcp"] is False and allreduce["tcp"]["over_tcp"] is True
    assert allreduce["tcp"]["route"] in ("nodes", "loopback") and allreduce["shm"]["calls"] == 200
    model = report["model"]
    assert [r["ranks"] for r in model["rows"]] == [2, 4, 8, 16, 32, 64]
    assert set(model["local_ms"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert model["networks"] == ["10 Gb/s", "25 Gb/s", "100 Gb/s"] and model["per_row_us"] > 0
    assert model["messages"] == [[5, 8], [1, 8], [allreduce["count"], 8]]
    for row in model["rows"]:
        for net in model["networks"]:
            assert 0 < row[net]["efficiency"] < 1 and row[net]["step_ms"] > row["compute_ms"]
            assert row[net]["min_batch"] is None or row[net]["min_batch"] % row["ranks"] == 0
    table = out.with_suffix(".md").read_text()
    assert table in result.stdout and "| 2 | memory |" in table and "| 1 | stream |" in table
    assert "| shared memory | one host" in table and "| TCP | " in table
    assert "| 64 | 1 |" in table and "Smallest global batch" in table


def test_pytorch_beside_distnn_is_optional(tmp_path):
    """Without torch the comparison is skipped with the reason; an interpreter named with
    --torch that cannot import it is a one-line error (exit 2) before anything runs."""
    from distnn import bench_compare
    from distnn.errors import UserError
    assert bench_compare.torch_python("off") == (None, "--torch off")
    has_torch = subprocess.run([sys.executable, "-c", "import torch"]).returncode == 0
    python, reason = bench_compare.torch_python("auto")
    assert (python, reason) == ((sys.executable, None) if has_torch else
                                (None, f"PyTorch is not installed for {sys.executable}"))
    if not has_torch:
        with pytest.raises(UserError, match="cannot import torch"):
            bench_compare.torch_python(sys.executable)
    result = run_module("distnn.bench", "--torch", tmp_path / "no-python", "--out",
                        tmp_path / "bench")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--torch" in result.stderr and not (tmp_path / "bench.md").exists()


def test_the_side_by_side_table():
    from distnn import bench_compare
    epochs = [{"epoch": 0, "test_acc": 0.1, "elapsed_s": 0.0},
              {"epoch": 1, "test_acc": 0.97, "elapsed_s": 1.5},
              {"epoch": 2, "test_acc": 0.981, "elapsed_s": 3.25},
              {"epoch": 3, "test_acc": 0.99, "elapsed_s": 5.0}]
    assert bench_compare.first_at(epochs, 0.98) == (2, 3.25)
    assert bench_compare.first_at(epochs[:2], 0.98) == (None, None)
    report = {"target": 0.98, "rows": [
        {"trainer": "distnn", "processes": 2, "final_test_acc": 0.9842, "epoch": 5,
         "seconds": 6.5, "rounds": 3},
        {"trainer": "pytorch", "processes": 2, "samples_per_s": 30000.0, "epoch": None,
         "seconds": None, "rounds": 3}]}
    table = bench_compare.markdown(report, {2: 45000.0}, None)
    assert "| distnn | 2 | 45,000 | 5 | 6.50 s |" in table
    assert "| PyTorch DDP (gloo) | 2 | 30,000 | — | not reached |" in table
    assert "medians of 3" in table and "skipped" not in table
    assert "PyTorch skipped: no torch." in bench_compare.markdown(report, {}, "no torch")
