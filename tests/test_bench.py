"""The benchmark runs end to end in a tiny configuration (no speed is asserted)."""

import json
import os

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
        assert {"data_ms", "compute_ms", "reduction_ms"} <= set(run)
    assert report["plain_samples_per_s"] > 0 and report["exact_vs_plain"] > 0
    assert report["gemm_gflops"]["float32"] > 0 and report["bound_samples_per_s"] > 0
    table = out.with_suffix(".md").read_text()
    assert table in result.stdout and "| 2 | memory |" in table and "| 1 | stream |" in table
