"""distnn on arm64 gives the bits it gives on x86-64.

The README promises the same ``params_sha256`` and metrics on any machine; the rest of the
suite varies numpy's SIMD paths, BLAS threads and numpy's version on the machine it runs on
(x86-64 in CI). This module runs distnn on another instruction set: in a Debian arm64 root
file system under qemu-user (built and cached outside the repository by
``tests/arm64/rootfs.sh``; the same numpy, h5py, mpi4py and mpich versions as the host
venv, as aarch64 wheels), with the repository mounted read-only at /distnn. There the
in-process numerics tests pass, and a short training alone and on 2 MPI ranks, and the
34-run matrix of every activation, loss, dtype and optimizer setting
(``tests/helpers/train_matrix.py``), give the ``params_sha256`` and per-epoch metrics of
the same runs on this host; and one MPI job whose rank 0 runs on this host and rank 1 in
the root file system trains the short run together to those bits too.

It needs root (chroot, mounts, namespaces), qemu-aarch64 registered with binfmt_misc
(registered here when it is not) and the built root file system: without them the module
is skipped with the reason and the command to build it, or failed instead with
DISTNN_REQUIRE_ARM64=1 (CI). Each emulated command runs in a mount and PID namespace of
its own (``unshare``): its mounts vanish and its processes (MPICH's proxies and ranks,
which leave the launcher's session, included) are killed when it ends, even when a test
fails or times out, and the cached tree is mounted read-only, so no run changes it. The
emulated runs of the selected tests all start when the module does and each test waits
for its own: the module takes about their total CPU time over the machine's cores rather
than the sum of their times.
"""

import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, find_mpirun, mnist_arrays, run_env, run_result, trained, write_data

ROOTFS_SH = ROOT / "tests" / "arm64" / "rootfs.sh"
MARKER = ".distnn-complete"  # written last by rootfs.sh build
BUILD = "bash tests/arm64/rootfs.sh build (as root; 3 to 7 minutes once, then cached)"
TIMEOUT = 1200  # seconds for each emulated command, from the module's start
SHORT = ["--train-limit", "6000", "--val-size", "500", "--epochs", "2", "--layers", "784,64,10"]

ENV = {"PATH": "/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
       "QEMU_CPU": "neoverse-n1",        # qemu's default "max" model is 3-10x slower
       "OMP_NUM_THREADS": "1", "DISTNN_KERNELS": "numpy", "PYTHONPATH": "/distnn",
       "MPIR_CVAR_CH4_CMA_ENABLE": "0",  # qemu-user lacks process_vm_readv (messages >= ~16 KB)
       "PYTHONDONTWRITEBYTECODE": "1"}   # /distnn is read-only

# The numerics tests left out under emulation, and why.
DESELECT = {
    "tests/test_numerics.py::test_matrix_covers_every_activation_loss_dtype_and_optimizer":
        "the matrix runs under emulation in test_the_training_matrix_gives_the_host_bits",
    "tests/test_numerics.py::test_training_bits_do_not_depend_on_the_machine":
        "five more 34-run matrices (about 35 s each emulated), an old numpy from PyPI, numba",
    "tests/test_numerics.py::test_ranks_with_different_numerics_match_the_single_process":
        "MPMD jobs with an old numpy from PyPI and numba; mpirun runs in the short training",
    "tests/test_numerics.py::test_a_rank_with_flush_to_zero_is_refused":
        "x86-64 only (it skips elsewhere, but only after preparing MNIST: 4 s emulated)",
    "tests/test_rng.py::test_same_bits_with_the_oldest_supported_numpy":
        "installs numpy 1.24.4 from PyPI",
}
NUMERICS = ["tests/test_numerics.py", "tests/test_fixedmath.py", "tests/test_rng.py"]

# In a new mount and PID namespace: the cached tree read-only, the repository read-only at
# /distnn, the module's work folder at /out, then the command under chroot.
MOUNT_AND_RUN = r"""
set -eu
rootfs=$1 repo=$2 work=$3
shift 3
mount --bind "$rootfs" "$rootfs"
mount -o remount,bind,ro "$rootfs"
mount --bind "$repo" "$rootfs/distnn"
mount -o remount,bind,ro "$rootfs/distnn"
mount --bind "$work" "$rootfs/out"
mount -t proc proc "$rootfs/proc"
mount -t sysfs -o ro sysfs "$rootfs/sys"
mount -t tmpfs -o mode=1777 tmpfs "$rootfs/tmp"
mount -t tmpfs -o mode=1777 tmpfs "$rootfs/dev/shm"
chroot "$rootfs" "$@"
"""

# The emulated rank of a job of this host's mpiexec (Mixed): in a new mount and PID
# namespace, the cached tree under a tmpfs overlay (never written), the repository read-only
# at /distnn, the work folder at its own path (the same --data and --out on both ranks), then
# the command under chroot, with the file descriptors and environment hydra gave the rank.
ENTER = r"""
set -eu
rootfs=$1 repo=$2 top=$3 share=$4
shift 4
mount -t tmpfs -o mode=700 tmpfs "$top"
mkdir "$top/upper" "$top/work" "$top/root"
mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$top/upper,workdir=$top/work" "$top/root"
root=$top/root
mount --bind "$repo" "$root/distnn"
mount -o remount,bind,ro "$root/distnn"
mount -t proc proc "$root/proc"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mkdir -p "$root$share"
mount --bind "$share" "$root$share"
exec chroot "$root" "$@"
"""
# Both ranks of a Mixed job on the network path, over loopback: no shared memory between
# the two builds (NOLOCAL) and the OFI netmod's TCP provider on lo. (The wheel's default
# netmod, UCX 1.20.1, finds no route to a peer over lo, even between two x86-64 ranks.)
MIXED_ENV = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp",
             "FI_TCP_IFACE": "lo", "MPIR_CVAR_CH4_CMA_ENABLE": "0",
             "OMP_NUM_THREADS": "1", "DISTNN_KERNELS": "numpy"}
HOST_ONLY = ["LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"]
# hydra waits for ever for a rank that ends before MPI_Init (an ENTER or import failure):
# then end the job through mpiexec, PID 1 of its namespace, which ends its ranks on SIGTERM.
EMULATED_RANK = ('unshare --mount --propagation private --pid --fork --kill-child -- "$@" '
                 '|| { code=$?; kill -TERM 1; exit $code; }')

PLATFORM = """
import json, os, platform, numpy
try:
    from numpy._core import _multiarray_umath as m
except ImportError:
    from numpy.core import _multiarray_umath as m
print(json.dumps({"uname": os.uname().machine, "machine": platform.machine(),
                  "numpy": numpy.__version__, "asimd": m.__cpu_features__.get("ASIMD", False),
                  "built_for": numpy.show_config(mode="dicts")["Machine Information"]["host"]["cpu"]}))
"""


def arm64_problem():
    """(why the emulated runs cannot happen here or None, the root file system's folder)."""
    if os.geteuid() != 0:
        return "needs root (chroot, mounts, namespaces)", None
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command", None
    done = subprocess.run(["bash", str(ROOTFS_SH), "path"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"tests/arm64/rootfs.sh path failed: {done.stderr.strip()}", None
    folder = Path(done.stdout.strip())
    if not (folder / MARKER).is_file():
        return f"no complete arm64 root file system at {folder}; build it with: {BUILD}", folder
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not (entry.is_file() and entry.read_text().startswith("enabled")):
        done = subprocess.run(["bash", str(ROOTFS_SH), "binfmt"], capture_output=True, text=True)
        if done.returncode != 0:
            return f"cannot run arm64 programs: {done.stderr.strip()}", folder
    return None, folder


@pytest.fixture(scope="module")
def rootfs():
    """The complete arm64 root file system (skipped with the reason without one, failed
    instead with DISTNN_REQUIRE_ARM64=1)."""
    problem, folder = arm64_problem()
    if problem:
        if os.environ.get("DISTNN_REQUIRE_ARM64") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return folder


class Emulated:
    """A command started in the root file system (its namespaces: MOUNT_AND_RUN), its
    output in ``<name>.out`` and ``<name>.err`` of the work folder."""

    def __init__(self, rootfs, work, name, command, cwd="/out"):
        inside = ["/usr/bin/env", "-i", "-C", cwd, *[f"{k}={v}" for k, v in ENV.items()],
                  *map(str, command)]
        self.start(work, name, ["unshare", "--mount", "--propagation", "private", "--pid",
                                "--fork", "--kill-child", "--", "bash", "-c", MOUNT_AND_RUN,
                                "mount-and-run", str(rootfs), str(ROOT), str(work), *inside])

    def start(self, work, name, argv, env=None):
        self.name, self.out, self.err = name, work / f"{name}.out", work / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True)
        self.deadline = time.monotonic() + TIMEOUT

    def result(self):
        """(stdout, stderr) once the command succeeded; fails the test otherwise."""
        try:
            code = self.process.wait(max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish in {TIMEOUT} s under emulation:\n"
                        f"{self.tail()}")
        assert code == 0, f"{self.name} exited with {code} under emulation:\n{self.tail()}"
        return self.out.read_text(), self.err.read_text()

    def tail(self, lines=60):
        text = self.out.read_text() + self.err.read_text()
        return "\n".join(text.splitlines()[-lines:])

    def kill(self):
        """SIGKILL for unshare and the namespace's first process (its session): the kernel
        then ends every process of the PID namespace, and the mounts go with it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class Mixed(Emulated):
    """One MPI job of this host's mpiexec (MPMD): rank 0 this host's Python, rank 1 the
    root file system's (entered by ENTER, after a line saying where it runs), each running
    ``python -m distnn.train args --out <work>/<name>`` over MIXED_ENV. The job has a PID
    namespace of its own (and its /proc): killing it ends hydra's proxies and both ranks,
    and the emulated rank's mount namespace with them."""

    def __init__(self, rootfs, work, name, args):
        (work / "enter.sh").write_text(ENTER)
        (work / f"{name}.root").mkdir()
        args = [*map(str, args), "--out", str(work / name)]
        emulated = ["sh", "-c", EMULATED_RANK, "emulated-rank", "bash", str(work / "enter.sh"),
                    str(rootfs), str(ROOT), str(work / f"{name}.root"), str(work),
                    "/usr/bin/env", *[f"--unset={k}" for k in HOST_ONLY], "-C", "/tmp",
                    *[f"{k}={v}" for k, v in ENV.items()], "sh", "-c",
                    'echo "rank $PMI_RANK runs on $(uname -m)" && exec "$@"', "sh",
                    "python", "-m", "distnn.train", *args]
        host = [sys.executable, "-m", "distnn.train", *args]
        self.start(work, name, ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                                "--", find_mpirun(), "-n", "1", *host, ":", "-n", "1", *emulated],
                   env={**run_env(), **MIXED_ENV})


def mixed_problem(rootfs):
    """Why this host's mpiexec cannot start a rank in the root file system, or None."""
    try:
        here = importlib.metadata.version("mpich")
    except importlib.metadata.PackageNotFoundError:
        return "the job of an x86-64 and an arm64 rank needs the mpich wheel in this venv"
    if not list(rootfs.glob(f"opt/venv/lib/python3*/site-packages/mpich-{here}.dist-info")):
        return f"the arm64 root file system has no mpich {here}, as this venv has"
    if find_mpirun() is None:
        return "no mpirun found beside the interpreter or on PATH"
    return None


def numerics_command():
    command = ["python", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *NUMERICS]
    for node in DESELECT:
        command += ["--deselect", node]
    return command


JOBS = {  # test name: (job name, command, cwd) of the emulated runs each test waits for
    "test_the_emulation_is_real_arm64": [
        ("platform", ["sh", "-c", 'uname -m && exec python -c "$1"', "sh", PLATFORM], "/out")],
    "test_the_numerics_tests_pass_on_arm64": [("numerics", numerics_command(), "/distnn")],
    "test_the_short_training_gives_the_host_bits": [
        ("alone", ["python", "-m", "distnn.train", *SHORT, "--data", "/out/mnist.h5",
                   "--out", "/out/alone"], "/out"),
        ("2-ranks", ["mpirun", "-n", "2", "python", "-m", "distnn.train", *SHORT, "--data",
                     "/out/mnist.h5", "--out", "/out/2-ranks"], "/out")],
    "test_the_training_matrix_gives_the_host_bits": [
        ("matrix", ["python", "/distnn/tests/helpers/train_matrix.py", "/out/small.h5",
                    "/out/matrix"], "/out")],
    "test_one_job_of_an_x86_64_and_an_arm64_rank_gives_the_host_bits": [
        ("mixed", SHORT, None)],  # cwd None: a Mixed job of these arguments
}


@pytest.fixture(scope="module")
def emulated(rootfs, mnist_h5, tmp_path_factory, request):
    """The emulated runs of this module's selected tests, all started at once (a dict:
    job name -> Emulated); killed if still running when the module ends."""
    here = Path(__file__).resolve()
    selected = {item.originalname for item in request.session.items
                if Path(item.path).resolve() == here}
    work = tmp_path_factory.mktemp("arm64")
    shutil.copy(mnist_h5, work / "mnist.h5")
    write_data(work / "small.h5", *mnist_arrays(mnist_h5, 240, 60))  # as test_numerics.py's
    jobs = {}
    try:
        for test in sorted(selected & JOBS.keys(), key=list(JOBS).index):
            for name, command, cwd in JOBS[test]:
                if cwd is None:
                    if not mixed_problem(rootfs):
                        jobs[name] = Mixed(rootfs, work, name,
                                           [*command, "--data", work / "mnist.h5"])
                else:
                    jobs[name] = Emulated(rootfs, work, name, command, cwd)
        yield jobs
    finally:
        for job in jobs.values():
            job.kill()
        mounted = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                                 text=True).stdout.split("\n")
        left = [m for m in mounted if m.startswith((str(rootfs), str(work)))]
        assert not left, f"left mounted: {left}"


def test_the_emulation_is_real_arm64(emulated):
    """uname, Python and numpy inside all say aarch64, and numpy runs its ASIMD loops."""
    out, _ = emulated["platform"].result()
    uname, report = out.splitlines()[0], json.loads(out.splitlines()[-1])
    print(f"host {platform.machine()}, inside: {report}")
    assert uname == report["uname"] == report["machine"] == "aarch64"
    assert report["built_for"] == "aarch64" and report["asimd"]


def test_the_numerics_tests_pass_on_arm64(emulated):
    """tests/test_numerics.py, test_fixedmath.py and test_rng.py pass under emulation, but
    for the DESELECT ones."""
    out, _ = emulated["numerics"].result()  # pytest's exit status 0: every test passed
    print(out)
    assert " passed" in out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def host_short_run(mnist_h5, tmp_path_factory):
    return trained([*SHORT, "--data", mnist_h5], tmp_path_factory.mktemp("host") / "short")


@pytest.mark.parametrize("job", ["alone", "2-ranks"])
def test_the_short_training_gives_the_host_bits(job, emulated, host_short_run):
    """params_sha256 and every epoch's metrics (conftest.RUN_KEYS aside) of the short run on arm64,
    alone and under mpirun -n 2 there, equal those of the run alone on this host."""
    emulated[job].result()
    got = run_result(emulated[job].out.parent / job)
    print(f"params_sha256 on {platform.machine()}: {host_short_run[0]}, "
          f"on aarch64 ({job}): {got[0]}")
    assert got[0] == host_short_run[0]
    assert got[1] == host_short_run[1]


def test_the_training_matrix_gives_the_host_bits(emulated, tmp_path):
    """Every activation x loss x dtype and both optimizer settings (34 small runs, one
    process) give on arm64 the params_sha256 and metrics they give on this host."""
    out, _ = emulated["matrix"].result()
    there = json.loads(out.strip().splitlines()[-1])
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "train_matrix.py"),
                           str(emulated["matrix"].out.parent / "small.h5"), str(tmp_path)],
                          env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    here = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["numerics"] == here["numerics"]
    assert len(here["results"]) == 34
    differ = [name for name, result in here["results"].items()
              if there["results"].get(name) != result]
    assert not differ, f"different on arm64: {differ}"


def test_one_job_of_an_x86_64_and_an_arm64_rank_gives_the_host_bits(rootfs, emulated,
                                                                    host_short_run):
    """The strongest form of the promise: one MPI job, rank 0 on this host (x86-64 in CI)
    and rank 1 on arm64 under emulation, with the two builds talking over TCP on loopback
    (MIXED_ENV), trains the short run together to the params_sha256 and every epoch's
    metrics (conftest.RUN_KEYS aside) of the run alone on this host."""
    problem = mixed_problem(rootfs)
    if problem:
        pytest.skip(problem)
    out, _ = emulated["mixed"].result()
    assert "rank 1 runs on aarch64" in out.splitlines()
    folder = emulated["mixed"].out.parent / "mixed"
    assert json.loads((folder / "summary.json").read_text())["world_size"] == 2
    got = run_result(folder)
    print(f"params_sha256 alone on {platform.machine()}: {host_short_run[0]}, "
          f"rank 0 on {platform.machine()} and rank 1 on aarch64: {got[0]}")
    assert got[0] == host_short_run[0]
    assert got[1] == host_short_run[1]
