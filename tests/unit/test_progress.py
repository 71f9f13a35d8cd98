"""Bar or lines: decided by who started the process, not only by whether stdout is a terminal."""

import os
import pty

import pytest

from distnn.progress import LAUNCHER_VARIABLES, Progress, bar_wanted


@pytest.fixture
def terminal():
    """A real terminal (the slave end of a pseudo-terminal) as a text stream."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    yield stream
    stream.close()
    os.close(master)


def test_a_plain_process_on_a_terminal_draws_a_bar(terminal):
    assert terminal.isatty()
    assert bar_wanted("auto", terminal, environ={})


@pytest.mark.parametrize("variable", LAUNCHER_VARIABLES)
def test_a_terminal_given_by_a_launcher_gets_lines(terminal, variable):
    """Open MPI's mpirun gives rank 0 a pseudo-terminal while its output goes to a log."""
    assert not bar_wanted("auto", terminal, environ={variable: "0"})


def test_the_flag_decides_over_the_terminal(terminal, tmp_path):
    with open(tmp_path / "log", "w") as log:
        assert not bar_wanted("auto", log, environ={})
        assert bar_wanted("bar", log, environ={})
    assert not bar_wanted("lines", terminal, environ={})


def test_plain_lines_every_log_every_steps(tmp_path):
    with open(tmp_path / "log", "w") as log:
        progress = Progress(10, log_every=5, stream=log, mode="lines")
        assert progress.bar is None
        for step in range(1, 11):
            progress.update(step, 1, 0.5, 32)
        progress.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"]
