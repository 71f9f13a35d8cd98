"""The launchers without a scheduler: local.sh, and launch.sweep's grid and table."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import ROOT, error_line, run_env

from launch import sweep

SWEEP_SBATCH = ROOT / "launch" / "slurm" / "sweep.sbatch"


def test_local_launcher_runs_n_ranks(mnist_h5, tmp_path):
    env = run_env()
    env["DISTNN_PYTHON"] = sys.executable
    result = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "3", "--data",
                             str(mnist_h5), "--out", str(tmp_path), "--train-limit", "300",
                             "--val-size", "0", "--epochs", "1", "--layers", "784,8,10"],
                            env=env, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 3


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` first on PATH that records its arguments and submits nothing; returns
    the file it records into (missing until it is called)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.args"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {log}\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def sweep_cli(*args):
    """``python -m launch.sweep args...`` (PATH as the test has it), output captured."""
    env = run_env()
    env["PATH"] = os.environ["PATH"]
    return subprocess.run([sys.executable, "-m", "launch.sweep", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False, timeout=60)


def test_grid_of_three_settings_in_fixed_order(fake_sbatch, tmp_path):
    folder = tmp_path / "s"
    done = sweep_cli("submit", folder, "--schedule", "constant,cosine", "--nesterov", "off,on",
                     "--momentum", "0.5,0.9", "--", "--epochs", "2")
    assert done.returncode == 0, done.stderr
    assert "submitted 8 settings as job array 4242" in done.stdout
    assert (folder / "grid.tsv").read_text() == (
        "task\tmomentum\tnesterov\tschedule\n"
        "0\t0.5\toff\tconstant\n1\t0.5\toff\tcosine\n2\t0.5\ton\tconstant\n3\t0.5\ton\tcosine\n"
        "4\t0.9\toff\tconstant\n5\t0.9\toff\tcosine\n6\t0.9\ton\tconstant\n7\t0.9\ton\tcosine\n")
    sbatch_args = fake_sbatch.read_text().splitlines()
    assert "--array=0-7" in sbatch_args and sbatch_args[-3:] == [str(SWEEP_SBATCH), "--epochs", "2"]
    assert sorted(p.name for p in folder.glob("task-*")) == [f"task-{i}" for i in range(8)]


def element_args(folder, task, home):
    """The distnn.train arguments sweep.sbatch builds for one array element, read from a
    stand-in train.sbatch under ``home`` (so nothing is trained)."""
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), DISTNN_SWEEP=str(folder),
               DISTNN_HOME=str(home))
    done = subprocess.run(["bash", str(SWEEP_SBATCH), "--epochs", "1"], env=env,
                          capture_output=True, text=True, check=False, timeout=30)
    return done.returncode, done.stdout.splitlines(), done.stderr


def test_sweep_sbatch_turns_grid_columns_into_train_flags(tmp_path):
    home = tmp_path / "home"
    (home / "launch" / "slurm").mkdir(parents=True)
    (home / "launch" / "slurm" / "train.sbatch").write_text(
        'printf "%s\\n" "out=$DISTNN_OUT" "$@"\n')
    names = ["batch_size", "nesterov", "weight_decay", "schedule"]
    points = [(32, "on", 0.0001, "cosine"), (64, "off", 0.0, "step")]
    sweep.write_grid(tmp_path / "new", names, points)
    assert element_args(tmp_path / "new", 0, home) == (0, [
        f"out={tmp_path}/new/task-0", "--batch-size", "32", "--nesterov", "--weight-decay",
        "0.0001", "--schedule", "cosine", "--epochs", "1"], "")
    assert element_args(tmp_path / "new", 1, home) == (0, [
        f"out={tmp_path}/new/task-1", "--batch-size", "64", "--weight-decay", "0.0",
        "--schedule", "step", "--epochs", "1"], "")
    for task, point in enumerate(points):  # the flags the submit-time check builds
        flags = element_args(tmp_path / "new", task, home)[1][1:-2]
        assert flags == sweep.train_flags(names, point)
    old = tmp_path / "old"  # written by the lr x batch-size version
    old.mkdir()
    (old / "grid.tsv").write_text("task\tlr\tbatch_size\n0\t0.1\t10\n1\t1.0\t10\n")
    assert element_args(old, 1, home)[1][1:] == ["--lr", "1.0", "--batch-size", "10",
                                                 "--epochs", "1"]
    status, out, err = element_args(old, 2, home)
    assert status == 2 and out == [] and "no settings for array task 2" in err


def test_grid_and_collected_table(tmp_path):
    names, points = sweep.make_grid({"momentum": [0.0, 0.9], "lr": [0.1, 1.0], "warmup": None})
    assert names == ["lr", "momentum"]
    assert points == [(0.1, 0.0), (0.1, 0.9), (1.0, 0.0), (1.0, 0.9)]
    sweep.write_grid(tmp_path, names, points)
    for task, acc in ((0, 0.91), (2, 0.95)):
        (tmp_path / f"task-{task}" / "summary.json").write_text(json.dumps(
            {"test_acc": acc, "val_acc": acc - 0.01, "train_loss": 0.3, "epochs": 2, "steps": 40}))
    (tmp_path / "task-3" / "checkpoints").mkdir()
    table = sweep.collect(tmp_path)
    lines = table.splitlines()
    assert lines[0] == ("| task | lr | momentum | test_acc | val_acc | train_loss | epochs | steps "
                        "| status |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[:4] for r in rows] == [["2", "1.0", "0.0", "0.9500"], ["0", "0.1", "0.0", "0.9100"],
                                     ["1", "0.1", "0.9", "-"], ["3", "1.0", "0.9", "-"]]
    assert [r[-1] for r in rows] == ["done", "done", "missing", "unfinished"]
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "task,lr,momentum,test_acc,val_acc,train_loss,epochs,steps,status"
    assert csv_lines[1] == "2,1.0,0.0,0.95,0.94,0.3,2,40,done"


def test_collect_reads_a_sweep_of_the_lr_by_batch_size_version(tmp_path):
    (tmp_path / "grid.tsv").write_text("task\tlr\tbatch_size\n0\t0.1\t10\n1\t1.0\t10\n")
    (tmp_path / "task-1").mkdir()
    (tmp_path / "task-1" / "summary.json").write_text(json.dumps(
        {"test_acc": 0.9, "val_acc": 0.89, "train_loss": 0.3, "epochs": 2, "steps": 40}))
    sweep.collect(tmp_path)
    assert (tmp_path / "results.csv").read_text().splitlines() == [
        "task,lr,batch_size,test_acc,val_acc,train_loss,epochs,steps,status",
        "1,1.0,10,0.9,0.89,0.3,2,40,done", "0,0.1,10,,,,,,missing"]


def test_sweep_errors_are_one_line_and_write_nothing(fake_sbatch, tmp_path):
    missing = sweep_cli("collect", tmp_path)
    assert "no grid.tsv" in error_line(missing)
    sweep.write_grid(tmp_path / "s", ["lr"], [(0.1,)])
    again = sweep_cli("submit", tmp_path / "s", "--lr", "0.1")
    assert "already holds a sweep" in error_line(again)
    cases = {
        "--lr fast": "--lr: 'fast': not a comma-separated list of numbers",
        "--batch-size 32,6.4": "--batch-size: '32,6.4': not a comma-separated list of whole",
        "--nesterov off,yes": "--nesterov: 'off,yes': values must be off or on",
        "--lr 1,1": "give distinct values",
        "": "name at least one setting to sweep, e.g. --lr 0.1,1",
        "--lr 1 --momentum 0.9,1.2":
            "grid point lr=1.0 momentum=1.2: --momentum must be at least 0 and below 1, got 1.2",
        "--lr 1 --momentum 0 --nesterov off,on":
            "grid point lr=1.0 momentum=0.0 nesterov=on: --nesterov needs momentum",
        "--schedule cosine,bogus": "schedule=bogus: argument --schedule: invalid choice",
        "--momentum 0.5,0.9 -- --mom 0": "--momentum is swept: do not give it after --",
        "--lr 0.1 -- --epochs 0": "grid point lr=0.1: --epochs must be positive",
        "--lr 0.1 --ntasks 0": "--ntasks must be at least 1, got 0",
        "--lr 0.1 -- --help": "the arguments after -- ask for help, not a run",
        "--lr 0.1 --schedule step -- --decay-every 1e308":
            "--decay-every 1e+308 epochs is longer than the run"}
    for args, message in cases.items():
        args = args.split() if " -- " in args else args.split() + ["--", "--epochs", "1"]
        result = sweep_cli("submit", tmp_path / "t", *args)
        assert result.returncode == 2 and message in error_line(result), (args, result.stderr)
    assert not (tmp_path / "t").exists() and not fake_sbatch.exists()
    for result in (missing, again):
        assert result.returncode == 2


def test_a_sweep_not_submitted_leaves_nothing_behind(tmp_path, monkeypatch):
    """sbatch refusing the array, a file where the folder should be, a folder in use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    refused = sweep_cli("submit", tmp_path / "new", "--lr", "0.1,1", "--", "--epochs", "1")
    assert "sbatch failed: sbatch: error: invalid partition" in error_line(refused)
    assert refused.returncode == 2 and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    sweep_cli("submit", tmp_path / "empty", "--lr", "0.1", "--", "--epochs", "1")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    (tmp_path / "file").write_text("x")
    (tmp_path / "used" / "task-0").mkdir(parents=True)
    for folder, message in ((tmp_path / "file", "is a file, not a folder"),
                            (tmp_path / "used", "is not empty; choose a new or empty folder")):
        result = sweep_cli("submit", folder, "--lr", "0.1", "--", "--epochs", "1")
        assert result.returncode == 2 and message in error_line(result)
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "used" / "grid.tsv").exists()


def test_nodes_status_answers_with_or_without_nodes():
    """launch/nodes.sh status needs no root and always says what is there."""
    done = subprocess.run(["bash", str(ROOT / "launch" / "nodes.sh"), "status"],
                          capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == ["nodes.sh: no simulated nodes"] or lines[0].startswith("bridge distnn-br0")


SUMMARY = {"test_acc": 0.9, "val_acc": 0.89, "train_loss": 0.3, "epochs": 2, "steps": 40}
BAD_SWEEPS = {  # case: (grid.tsv, task-0's summary, the error after the sweep folder)
    "an empty grid": ("", None, "grid.tsv: is empty; launch.sweep submit writes a header"),
    "a blank grid": ("\n  \n", None, "grid.tsv: is empty"),
    "a task that is not a number": ("task\tlr\n0\t0.1\n\nx\t1.0\n", None,
                                    "grid.tsv line 4: task 'x' is not an array task number"),
    "a negative task": ("task\tlr\n-1\t0.1\n", None, "grid.tsv line 2: task '-1' is not an array"),
    "no task column": ("lr\n0.1\n", None,
                       "grid.tsv line 1: the header does not start with the task column"),
    "non-UTF-8 bytes": (b"task\tlr\n0\t0.1\n1\t\xff\n", None, "grid.tsv line 3: not UTF-8 text"),
    "a string score": (None, {**SUMMARY, "test_acc": "0.9"},
                       'task-0/summary.json: test_acc "0.9" is not a finite number'),
    "a list score": (None, {**SUMMARY, "val_acc": [0.9]},
                     "task-0/summary.json: val_acc [0.9] is not a finite number"),
    "a NaN score": (None, {**SUMMARY, "test_acc": float("nan")},
                    "task-0/summary.json: test_acc NaN is not a finite number"),
    "a fractional count": (None, {**SUMMARY, "steps": 1.5},
                           "task-0/summary.json: steps 1.5 is not a whole number"),
}


@pytest.mark.parametrize("case", BAD_SWEEPS)
def test_collect_refuses_a_grid_or_summary_that_is_not_a_sweeps_in_one_line(tmp_path, capsys,
                                                                             case):
    grid, summary, message = BAD_SWEEPS[case]
    grid = "task\tlr\n0\t0.1\n1\t1.0\n" if grid is None else grid
    (tmp_path / "grid.tsv").write_bytes(grid.encode() if isinstance(grid, str) else grid)
    for task, written in ((0, summary), (1, SUMMARY)):
        if written is not None:
            (tmp_path / f"task-{task}").mkdir()
            (tmp_path / f"task-{task}" / "summary.json").write_text(json.dumps(written))
    assert sweep.main(["collect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launch.sweep: error: {tmp_path}/") and message in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "results.csv").exists() and not (tmp_path / "results.md").exists()


def test_collect_skips_blank_lines(tmp_path):
    (tmp_path / "grid.tsv").write_text("\ntask\tlr\n\n0\t0.1\n  \n1\t1.0\n\n")
    (tmp_path / "task-1").mkdir()
    (tmp_path / "task-1" / "summary.json").write_text(json.dumps(SUMMARY))
    sweep.collect(tmp_path)
    assert (tmp_path / "results.csv").read_text().splitlines() == [
        "task,lr,test_acc,val_acc,train_loss,epochs,steps,status",
        "1,1.0,0.9,0.89,0.3,2,40,done", "0,0.1,,,,,,missing"]


@contextmanager
def read_only(folder):
    """``folder`` read-only for the block: bound read-only onto itself as root (who may
    write anywhere else), else without its write permission."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_collect_results_that_cannot_be_written_are_one_line(tmp_path, capsys):
    """results.csv or results.md a folder, or a read-only sweep folder: one line naming
    the file, and neither file half written."""
    folder = tmp_path / "s"
    sweep.write_grid(folder, ["lr"], [(0.1,)])
    for name in ("results.csv", "results.md"):
        (folder / name).mkdir()
        assert sweep.main(["collect", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err == f"launch.sweep: error: cannot write {folder / name}: Is a directory\n"
        (folder / name).rmdir()
    (folder / "results.csv").unlink()  # written before results.md was refused
    with read_only(folder):
        assert sweep.main(["collect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launch.sweep: error: cannot write {folder / 'results.csv'}: ")
    assert len(err.splitlines()) == 1 and sorted(os.listdir(folder)) == ["grid.tsv", "task-0"]


def test_no_fifo_or_symlink_in_a_sweep_folder_is_opened_or_followed(tmp_path):
    """A FIFO as grid.tsv or a task's summary.json is refused before it is opened (it
    would block for ever); a symlinked grid.tsv is refused and a symlinked results.csv
    replaced, its target left alone."""
    folder, outside = tmp_path / "s", tmp_path / "outside"
    sweep.write_grid(folder, ["lr"], [(0.1,), (1.0,)])
    os.mkfifo(folder / "task-1" / "summary.json")
    result = sweep_cli("collect", folder)
    assert result.returncode == 2 and error_line(result) == (
        f"launch.sweep: error: cannot read {folder}/task-1/summary.json: is a FIFO, not a "
        "regular file")
    (folder / "task-1" / "summary.json").unlink()
    outside.write_text((folder / "grid.tsv").read_text())
    for kind in ("a FIFO", "a symbolic link"):
        (folder / "grid.tsv").unlink()
        os.mkfifo(folder / "grid.tsv") if kind == "a FIFO" else (folder / "grid.tsv").symlink_to(outside)
        result = sweep_cli("collect", folder)
        assert result.returncode == 2 and error_line(result) == (
            f"launch.sweep: error: cannot read {folder}/grid.tsv: is {kind}, not a regular file")
    (folder / "grid.tsv").unlink()
    (folder / "grid.tsv").write_text(outside.read_text())
    (folder / "results.csv").symlink_to(outside)
    assert sweep_cli("collect", folder).returncode == 0
    assert outside.read_text() == "task\tlr\n0\t0.1\n1\t1.0\n"
    assert not (folder / "results.csv").is_symlink()
    assert (folder / "results.csv").read_text().startswith("task,lr,test_acc")


def test_submit_refusals_are_one_line_and_print_nothing_else(fake_sbatch, tmp_path):
    """Under a file, a name too long (in a new folder too: it is not left behind), and
    -- --help (no help printed before the error)."""
    (tmp_path / "file").write_text("x")
    long_name = "x" * 300
    cases = {tmp_path / "file" / "s": "{}: cannot create it: Not a directory",
             tmp_path / long_name: "{}: cannot create it: File name too long",
             tmp_path / "new" / long_name: "cannot write the sweep into {}: File name too long"}
    for folder, message in cases.items():
        result = sweep_cli("submit", folder, "--lr", "0.1", "--", "--epochs", "1")
        assert result.returncode == 2 and result.stdout == ""
        assert error_line(result) == "launch.sweep: error: " + message.format(folder)
    for asked in ("--help", "-h", "--hel"):
        result = sweep_cli("submit", tmp_path / "h", "--lr", "0.1", "--", "--epochs", "1", asked)
        assert result.returncode == 2 and result.stdout == "", result.stdout[:200]
        assert "the arguments after -- ask for help, not a run" in error_line(result)
    assert sorted(os.listdir(tmp_path)) == ["bin", "file"] and not fake_sbatch.exists()
