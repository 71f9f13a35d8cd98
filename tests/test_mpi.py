"""In-process MPI tests, run under ``mpirun -n N python -m pytest --with-mpi``."""

import numpy as np
import pytest

from distnn import train
from distnn.config import Config
from distnn.exact import ExactGradients, ExactSum, NonFiniteError
from distnn.model import params_digest
from distnn.parallel import SignalAgreement, broadcast_params


@pytest.fixture
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
def test_exact_sum_is_independent_of_the_partition(comm):
    """Any split of 37 rows over the ranks gives the bits of the serial sum."""
    from mpi4py import MPI
    rng = np.random.default_rng(11)
    rows = [rng.normal(size=(37, 15)) * 10.0 ** rng.integers(-6, 6, (37, 15)),
            rng.normal(size=(37, 4)).astype(np.float32)]
    serial = ExactSum([15, 4], MPI.COMM_SELF)(rows, 37)
    for trial in range(5):
        cuts = np.sort(np.random.default_rng(trial).integers(0, 38, comm.size - 1))
        edges = np.concatenate([[0], cuts, [37]])
        lo, hi = edges[comm.rank], edges[comm.rank + 1]
        got = ExactSum([15, 4], comm)([r[lo:hi] for r in rows], 37)
        assert all(np.array_equal(a, b) for a, b in zip(got, serial))
        assert np.allclose(got[0], rows[0].sum(axis=0), rtol=1e-12, atol=0)


@pytest.mark.mpi(min_size=2)
def test_exact_gradients_are_independent_of_the_partition(comm):
    """sum_r a_r^T d_r over any split of the rows equals the serial result, bit for bit."""
    from mpi4py import MPI
    rng = np.random.default_rng(5)
    n = 41
    pixels = rng.integers(0, 256, (n, 6)).astype(np.float64)
    hidden = rng.uniform(0, 1, (n, 5)).astype(np.float32)
    deltas = [rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)]
    stats = rng.uniform(0, 3, (n, 2))
    serial = ExactGradients([6, 5, 3], 2, MPI.COMM_SELF)([pixels, hidden], deltas, stats, n)
    for trial in range(5):
        cuts = np.sort(np.random.default_rng(100 + trial).integers(0, n + 1, comm.size - 1))
        edges = np.concatenate([[0], cuts, [n]])
        lo, hi = edges[comm.rank], edges[comm.rank + 1]
        grads, sums = ExactGradients([6, 5, 3], 2, comm)(
            [pixels[lo:hi], hidden[lo:hi]], [d[lo:hi] for d in deltas], stats[lo:hi], n)
        for (gW, gb), (sW, sb) in zip(grads, serial[0]):
            assert np.array_equal(gW, sW) and np.array_equal(gb, sb)
        assert np.array_equal(sums, serial[1])
    # and the exact sums are the true sums to within their grid
    np.testing.assert_allclose(serial[0][0][0], pixels.T @ deltas[0].astype(np.float64),
                               rtol=1e-9)
    np.testing.assert_allclose(serial[0][1][0], hidden.T.astype(np.float64) @ deltas[1], rtol=1e-5)


@pytest.mark.mpi(min_size=2)
def test_non_finite_on_one_rank_is_seen_by_all(comm):
    part = np.ones((1, 3))
    if comm.rank == comm.size - 1:
        part[0, 1] = np.nan
    with pytest.raises(NonFiniteError):
        ExactSum([3], comm)([part], comm.size)


@pytest.mark.mpi(min_size=2)
def test_a_signal_on_one_rank_is_agreed_by_all(comm):
    agree = SignalAgreement(comm)
    assert agree(0) == 0
    assert agree(10 if comm.rank == comm.size - 1 else 0) == 10  # SIGUSR1 on the last rank
    assert agree(15 if comm.rank == 0 else 10) == 15


@pytest.mark.mpi(min_size=2)
def test_parameters_start_as_rank_0s(comm):
    params = [(np.full((3, 2), comm.rank, np.float32), np.full(2, comm.rank, np.float32))]
    broadcast_params(comm, params)
    assert not params[0][0].any() and not params[0][1].any()


@pytest.mark.mpi(min_size=2)
def test_training_on_world_equals_training_alone(comm, mnist_h5, tmp_path):
    """run() on COMM_WORLD and on COMM_SELF give the same parameters on every rank."""
    from mpi4py import MPI
    shared_out = comm.bcast(str(tmp_path / "world") if comm.rank == 0 else None, root=0)
    settings = dict(data=str(mnist_h5), layers=(784, 12, 10), batch_size=30,
                    epochs=2, train_limit=400, val_size=40, lr=0.3, quiet=True)
    world_params, world_summary = train.run(Config(out=shared_out, **settings), comm)
    alone_params, alone_summary = train.run(Config(out=str(tmp_path / "alone"), **settings),
                                            MPI.COMM_SELF)
    assert params_digest(world_params) == params_digest(alone_params)
    assert world_summary["params_sha256"] == alone_summary["params_sha256"]
    assert world_summary["test_acc"] == alone_summary["test_acc"]
    assert len(set(comm.allgather(params_digest(world_params)))) == 1
