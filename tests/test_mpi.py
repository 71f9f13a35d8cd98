"""In-process MPI tests, run under ``mpirun -n N python -m pytest --with-mpi``."""

import numpy as np
import pytest

from distnn import train
from distnn.comm import params_digest
from distnn.config import Config
from distnn.exact import ExactSum, NonFiniteError


@pytest.fixture
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
def test_exact_sum_is_independent_of_the_partition(comm):
    """Any split of 37 blocks over the ranks gives the bits of the serial sum."""
    from mpi4py import MPI
    rng = np.random.default_rng(11)
    blocks = [rng.normal(size=(37, 5, 3)) * 10.0 ** rng.integers(-6, 6, (37, 5, 3)),
              rng.normal(size=(37, 4)).astype(np.float32)]
    serial = ExactSum([(5, 3), (4,)], MPI.COMM_SELF)(blocks, 37)
    for trial in range(5):
        cuts = np.sort(np.random.default_rng(trial).integers(0, 38, comm.size - 1))
        edges = np.concatenate([[0], cuts, [37]])
        lo, hi = edges[comm.rank], edges[comm.rank + 1]
        mine = [b[lo:hi] for b in blocks]
        got = ExactSum([(5, 3), (4,)], comm)(mine, 37)
        assert all(np.array_equal(a, b) for a, b in zip(got, serial))
        plain = np.zeros(15)
        comm.Allreduce(np.ascontiguousarray(blocks[0][lo:hi].sum(axis=0).ravel()), plain)
        assert np.allclose(plain.reshape(5, 3), serial[0], rtol=1e-12, atol=1e-300)


@pytest.mark.mpi(min_size=2)
def test_non_finite_on_one_rank_is_seen_by_all(comm):
    part = np.ones((1, 3))
    if comm.rank == comm.size - 1:
        part[0, 1] = np.nan
    with pytest.raises(NonFiniteError):
        ExactSum([(3,)], comm)([part], comm.size)


@pytest.mark.mpi(min_size=2)
def test_training_on_world_equals_training_alone(comm, mnist_h5, tmp_path):
    """run() on COMM_WORLD and on COMM_SELF give the same parameters on every rank."""
    from mpi4py import MPI
    shared_out = comm.bcast(str(tmp_path / "world") if comm.rank == 0 else None, root=0)
    settings = dict(data=str(mnist_h5), layers=(784, 12, 10), batch_size=30, block_size=3,
                    epochs=2, train_limit=400, val_size=40, lr=0.3)
    world_params, world_summary = train.run(Config(out=shared_out, **settings), comm,
                                            log=lambda *a: None)
    alone_params, alone_summary = train.run(Config(out=str(tmp_path / "alone"), **settings),
                                            MPI.COMM_SELF, log=lambda *a: None)
    assert params_digest(world_params) == params_digest(alone_params)
    assert world_summary["params_sha256"] == alone_summary["params_sha256"]
    assert world_summary["test_acc"] == alone_summary["test_acc"]
    assert len(set(comm.allgather(params_digest(world_params)))) == 1
