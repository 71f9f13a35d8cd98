"""distnn.launcher: which MPI a launcher is, the command for it, and the Open MPI relay."""

import os
import signal
import subprocess
import sys
import time

import pytest

from distnn import launcher

BANNERS = {  # the first lines each MPI's mpiexec --version prints
    launcher.MPICH: "HYDRA build details:\n    Version:                                 5.0.2",
    launcher.OPENMPI: "mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/",
    launcher.INTEL: "Intel(R) MPI Library for Linux* OS, Version 2021.18.1 Build 20260626",
}


def fake_mpiexec(folder, banner):
    """An mpiexec that prints ``banner`` for --version, beside a python in ``folder``."""
    folder.mkdir()
    script = folder / "mpiexec"
    script.write_text(f"#!/bin/sh\ncat <<'END'\n{banner}\nEND\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("kind", list(BANNERS))
def test_each_mpi_is_recognised_from_its_banner(kind, tmp_path):
    assert launcher.flavour(str(fake_mpiexec(tmp_path / "bin", BANNERS[kind]))) == kind


@pytest.mark.parametrize("kind", list(BANNERS))
def test_the_command_never_takes_a_broken_path(kind, tmp_path):
    mpiexec = fake_mpiexec(tmp_path / "bin", BANNERS[kind])
    found, prefix, env = launcher.command(3, python=str(tmp_path / "bin" / "python"),
                                          hostfile="nodes")
    assert found == kind and prefix[-2:] == ["-n", "3"]
    assert env["PATH"].split(os.pathsep)[0] == str(mpiexec.parent)  # hydra finds its proxy
    if kind == launcher.INTEL:  # never the wheel's mpirun script, which forwards no signal
        assert prefix[0] == str(mpiexec.parent / "mpiexec.hydra") and "-f" in prefix
    elif kind == launcher.OPENMPI:
        assert "--oversubscribe" in prefix and prefix[prefix.index("--hostfile") + 1] == "nodes"
        assert (env.get("OMPI_ALLOW_RUN_AS_ROOT") == "1") == (os.geteuid() == 0)
    else:
        assert prefix[0] == str(mpiexec) and "-f" in prefix


# a stand-in for prterun: says when it is ready; a SIGUSR1 makes it exit 75 after a while
# (the ranks finish their step and write a checkpoint), a SIGTERM exit 1 at once (prterun
# kills the ranks)
LAUNCHER = """import signal, sys, time
stop = []
def on_usr1(*args):
    stop.append(time.monotonic())
    print("stopping", flush=True)
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not (stop and time.monotonic() > stop[0] + 0.5):
    time.sleep(0.01)
sys.exit(75 if stop else 0)
"""
RELAY = "import sys; from distnn import launcher; sys.exit(launcher.relay(sys.argv[1:], None))"


@pytest.mark.parametrize("signals, code", [
    ([signal.SIGTERM], 75), ([signal.SIGUSR1], 75), ([signal.SIGINT], 130),
    ([signal.SIGHUP], 129), ([signal.SIGINT, signal.SIGINT], 130)])
def test_the_relay_turns_stop_signals_into_sigusr1(signals, code, tmp_path):
    """Each stop signal reaches Open MPI's launcher as the SIGUSR1 it forwards; the relay
    ends with the code of the signal it got; a second Ctrl-C ends the job at once."""
    relay = subprocess.Popen([sys.executable, "-c", RELAY, sys.executable, "-c", LAUNCHER],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert relay.stdout.readline() == "ready\n"
        relay.send_signal(signals[0])
        assert relay.stdout.readline() == "stopping\n"  # relayed: the next signal is another
        started = time.monotonic()
        for signum in signals[1:]:
            relay.send_signal(signum)
        assert relay.wait(timeout=30) == code
        if len(signals) > 1:  # at once, not after the stand-in's half-second stop
            assert time.monotonic() - started < 0.4
    finally:
        if relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)
