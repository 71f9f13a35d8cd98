"""distnn.state: counting steps and epochs; and the state every rank starts from
(distnn.parallel.share_state)."""

import numpy as np
from mpi4py import MPI

from distnn import model
from distnn.parallel import share_state
from distnn.state import TrainState


def test_steps_add_up_within_an_epoch_and_an_epoch_closes_with_its_record():
    state = TrainState(params=[])
    state.advance(30, np.array([1.5, 20.0]))
    state.advance(12, np.array([0.5, 10.0]))
    assert (state.step, state.position, state.seen) == (2, 2, 42)
    assert np.array_equal(state.totals, [2.0, 30.0])
    state.next_epoch({"epoch": 1})
    assert (state.epoch, state.step, state.position, state.seen) == (2, 2, 0, 0)
    assert not state.totals.any() and state.history == [{"epoch": 1}]


def test_a_shared_state_is_rank_0s_whole():
    params = model.init_params([5, 3, 2], seed=1)
    velocity = [(W + 1, b + 1) for W, b in params]
    state = TrainState(params=params, velocity=velocity, step=7, epoch=2, position=3,
                       totals=np.array([0.25, 4.0]), seen=90, history=[{"epoch": 1}],
                       elapsed_s=1.5)
    mine = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    held = share_state(MPI.COMM_SELF, state, mine, [(np.zeros_like(W), np.zeros_like(b))
                                                    for W, b in params])
    for name in ("step", "epoch", "position", "seen", "history", "elapsed_s"):
        assert getattr(held, name) == getattr(state, name)
    assert np.array_equal(held.totals, state.totals)
    for (W, b), (W2, b2) in zip(held.params + held.velocity, params + velocity):
        assert np.array_equal(W, W2) and np.array_equal(b, b2)
