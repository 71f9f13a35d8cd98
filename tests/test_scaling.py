"""distnn.scaling: MPICH's Allreduce algorithm by size, its alpha-beta cost, the step model
and its efficiency, the smallest batch for a target; distnn.allreduce_bench: the 2-rank
measurement and the evidence of its transport."""

import math
import shutil

import pytest

from distnn import allreduce_bench, scaling
from distnn.scaling import RABENSEIFNER, RECURSIVE_DOUBLING, Network, StepModel

TEN = Network("10", 10e9, 30e-6)
HUNDRED = Network("100", 100e9, 30e-6)
GRADS = 145_682  # float64 values of the gradient buffer at 784-256-10, batch 256
AGREE = 6        # int64 values of the grid agreement (two layers)


def step_model(fixed_s=0.6e-3, per_row_s=20e-6, grads=GRADS, gamma=math.inf):
    return StepModel(per_row_s, fixed_s, lambda batch: [(AGREE, 8), (grads, 8)], gamma)


def test_algorithm_by_size_as_mpich_5_selects():
    for p in (2, 4, 8, 16, 32, 64, 6):
        assert scaling.allreduce_algorithm(GRADS, 8, p) == RABENSEIFNER
        assert scaling.allreduce_algorithm(1, 8, p) == RECURSIVE_DOUBLING  # <= 8 bytes
        assert scaling.allreduce_algorithm(GRADS, 8, p, builtin_op=False) == RECURSIVE_DOUBLING
    # the 6-value agreement: enough items for 2 and 4 ranks, fewer than the power of two from 8
    assert [scaling.allreduce_algorithm(AGREE, 8, p) for p in (2, 4, 6, 8, 64)] == \
        [RABENSEIFNER, RABENSEIFNER, RABENSEIFNER, RECURSIVE_DOUBLING, RECURSIVE_DOUBLING]
    assert [scaling.pof2(p) for p in (1, 2, 3, 6, 8, 63, 64)] == [1, 2, 2, 4, 8, 32, 64]


def test_allreduce_time_by_hand():
    n = 1_000_000  # bytes: 125,000 float64
    # reduce-scatter + allgather on 8 ranks: 2 log2(8) alpha + 2 (7/8) n beta
    assert scaling.allreduce_seconds(n // 8, 8, 8, TEN) == pytest.approx(6 * 30e-6 + 1.75 * n * 8e-10)
    assert scaling.allreduce_seconds(n // 8, 8, 8, TEN) == pytest.approx(1.58e-3)
    # ... plus (7/8) n gamma of additions at 10 GB/s
    assert scaling.allreduce_seconds(n // 8, 8, 8, TEN, 10e9) == pytest.approx(1.58e-3 + 87.5e-6)
    # recursive doubling of one int64 on 8 ranks: 3 (alpha + 8 beta)
    assert scaling.allreduce_seconds(1, 8, 8, TEN) == pytest.approx(3 * (30e-6 + 8 * 8e-10))
    # 6 ranks: 2 hand their vector to a partner and get the result back, the other 4 run it
    assert scaling.allreduce_seconds(n // 8, 8, 6, TEN) == pytest.approx(
        2 * (30e-6 + n * 8e-10) + 4 * 30e-6 + 1.5 * n * 8e-10)
    assert scaling.allreduce_seconds(n // 8, 8, 1, TEN) == 0.0


def test_allreduce_time_grows_with_ranks_and_falls_with_bandwidth():
    times = [scaling.allreduce_seconds(GRADS, 8, p, TEN) for p in (2, 4, 8, 16, 32, 64)]
    assert times == sorted(times) and times[-1] < 2 * 8 * GRADS * 8e-10 + 12 * 30e-6
    # ten times the bandwidth takes 9/10 of the wire time off, none of the latency
    assert times[3] - scaling.allreduce_seconds(GRADS, 8, 16, HUNDRED) == pytest.approx(
        0.9 * 2 * 15 / 16 * 8 * GRADS * 8e-10)


def test_efficiency_rises_with_batch_and_bandwidth_and_falls_with_ranks():
    model = step_model()
    assert scaling.efficiency(model, 1, 256, TEN) == 1.0
    by_batch = [scaling.efficiency(model, 16, b, TEN) for b in (256, 1024, 4096, 16384)]
    assert by_batch == sorted(by_batch) and by_batch[0] < 0.2 < 0.7 < by_batch[-1] < 1
    by_ranks = [scaling.efficiency(model, p, 4096, TEN) for p in (2, 4, 8, 16, 32, 64)]
    assert by_ranks == sorted(by_ranks, reverse=True)
    assert scaling.efficiency(model, 16, 4096, HUNDRED) > scaling.efficiency(model, 16, 4096, TEN)


def test_step_time_by_hand():
    model = step_model(fixed_s=1e-3, per_row_s=10e-6)
    # 16 ranks, batch 1000: 63 rows on the busiest rank; MAX of 6 int64 by recursive
    # doubling, SUM of the gradients by reduce-scatter + allgather
    expected = (1e-3 + 63 * 10e-6 + 4 * (30e-6 + 48 * 8e-10)
                + 8 * 30e-6 + 2 * 15 / 16 * 8 * GRADS * 8e-10)
    assert scaling.step_seconds(model, 16, 1000, TEN) == pytest.approx(expected)
    assert scaling.step_seconds(model, 1, 1000, TEN) == pytest.approx(1e-3 + 1000 * 10e-6)


def test_min_batch_matches_the_closed_form_without_a_fixed_part():
    # no fixed part, messages independent of the batch: E = rB / (rB + P c) >= 0.8 <=> B >= 4 P c / r
    model = step_model(fixed_s=0.0, per_row_s=20e-6)
    for p in (2, 16, 64):
        c = scaling.comm_seconds(model, p, 0, TEN)
        exact = 4 * p * c / 20e-6
        found = scaling.min_batch(model, p, TEN, 0.8)
        assert found % p == 0 and exact <= found < exact + p
        assert scaling.efficiency(model, p, found, TEN) >= 0.8 > scaling.efficiency(model, p, found - p, TEN)


def test_min_batch_needs_more_with_a_fixed_part_ranks_or_a_slower_network():
    fixed, none = step_model(fixed_s=0.6e-3), step_model(fixed_s=0.0)
    assert scaling.min_batch(fixed, 16, TEN) > scaling.min_batch(none, 16, TEN)
    assert scaling.min_batch(fixed, 16, TEN) > scaling.min_batch(fixed, 16, HUNDRED)
    assert scaling.min_batch(fixed, 64, TEN) > scaling.min_batch(fixed, 16, TEN)
    assert scaling.min_batch(fixed, 64, TEN, limit=1000) is None


def test_model_tables_report_each_rank_count_and_network():
    rows = scaling.model_tables(step_model(), [TEN, HUNDRED], [2, 64], 256)
    assert [r["ranks"] for r in rows] == [2, 64] and rows[1]["rows_per_rank"] == 4
    assert rows[0]["algorithms"] == [RABENSEIFNER, RABENSEIFNER]
    assert rows[1]["algorithms"] == [RECURSIVE_DOUBLING, RABENSEIFNER]
    for r in rows:
        assert r["10"]["step_ms"] == pytest.approx(r["compute_ms"] + r["10"]["allreduce_ms"])
        assert 0 < r["10"]["efficiency"] < r["100"]["efficiency"] < 1
        assert r["10"]["min_batch"] > r["100"]["min_batch"]
    assert rows[1]["100"]["efficiency"] < 0.8 and rows[1]["100"]["min_batch"] > 256


def test_fit_line():
    intercept, slope = scaling.fit_line([4, 16, 64, 256], [0.7 + 0.02 * x for x in (4, 16, 64, 256)])
    assert intercept == pytest.approx(0.7) and slope == pytest.approx(0.02)


SS = """\
0      0      10.77.77.11:41000 10.77.77.12:52000 users:(("python",pid=101,fd=26))
\t bbr wscale:10,10 rto:204 bytes_sent:900 bytes_acked:900 bytes_received:1200 segs_out:4
0      0      10.77.77.11:41001 10.77.77.1:6000 users:(("python",pid=101,fd=7))
\t cubic rto:204 bytes_sent:40 bytes_received:30
0      0      10.77.77.11:41002 10.77.77.11:41003 users:(("hydra_pmi_proxy",pid=99,fd=7))
\t cubic rto:204 bytes_received:5
"""


def test_sockets_of_a_process_and_the_links_between_two_ranks():
    mine = allreduce_bench.parse_ss(SS, 101)
    assert mine == [["10.77.77.11:41000", "10.77.77.12:52000", 1200],
                    ["10.77.77.11:41001", "10.77.77.1:6000", 30]]
    theirs = [["10.77.77.12:52000", "10.77.77.11:41000", 900]]
    assert allreduce_bench.rank_links(mine, theirs) == [mine[0]]
    assert allreduce_bench.rank_links(mine, []) == []


NO_SS = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list sockets")


@NO_SS
def test_measured_on_two_ranks_shared_memory_carries_no_tcp_and_loopback_tcp_does(mpirun):
    result = allreduce_bench.measure(count=4096, small=AGREE, calls=20, rounds=1, tcp="loopback", warmup=5)
    shm, tcp = result["shm"], result["tcp"]
    assert shm["route"] == "shm" and shm["calls"] == 20 and tcp["route"] == "loopback"
    assert shm["over_tcp"] is False and shm["rank_sockets"] == 0
    assert tcp["over_tcp"] is True and tcp["rank_sockets"] >= 1
    # rank 0 received over TCP about the payload of each SUM (half reduced, half gathered)
    assert 0.9 < tcp["tcp_bytes_per_payload_byte"] < 1.5
    assert 0 < shm["sum_ms"] and 0 < tcp["max_us"] and shm["sum_ms_iqr"][0] <= shm["sum_ms"]


def test_measured_over_shared_memory_only(mpirun):
    result = allreduce_bench.measure(count=64, small=AGREE, calls=5, rounds=2, tcp="off", warmup=1)
    assert result["tcp"] is None and result["shm"]["launches"] == 2 and result["shm"]["calls"] == 10


@NO_SS
@pytest.mark.multinode
def test_measured_between_simulated_nodes(simulated_nodes, mpirun):
    result = allreduce_bench.measure(count=4096, small=AGREE, calls=20, rounds=1, tcp="nodes", warmup=5)
    tcp = result["tcp"]
    assert tcp["route"] == "nodes" and sorted(tcp["hosts"]) == ["node1", "node2"]
    assert tcp["over_tcp"] is True and result["note"] is None
