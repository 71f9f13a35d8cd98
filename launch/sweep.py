"""``python -m launch.sweep``: learning-rate x batch-size sweeps as a Slurm job array.

  python -m launch.sweep submit sweeps/lr --lr 0.001,0.1,1,10,100 --batch-size 10 -- --epochs 5
  python -m launch.sweep collect sweeps/lr

``submit`` writes ``grid.tsv`` (one line per setting) into the sweep folder and
submits ``launch/slurm/sweep.sbatch`` as an array with one element per line;
arguments after ``--`` go to every ``distnn.train``. ``collect`` reads each
element's ``summary.json`` and writes ``results.csv`` and ``results.md``,
sorted by test accuracy (unfinished settings last), and prints the table.
"""

import argparse
import csv
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from distnn.errors import cli

HOME = Path(__file__).resolve().parents[1]
SBATCH = HOME / "launch" / "slurm" / "sweep.sbatch"
COLUMNS = ("task", "lr", "batch_size", "test_acc", "val_acc", "train_loss", "epochs", "steps", "status")


class SweepError(Exception):
    """A user-facing problem; printed as one line."""


def numbers(text, kind):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: values must be positive")
    return values


def write_grid(folder, lrs, batch_sizes):
    grid = list(itertools.product(lrs, batch_sizes))
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["task\tlr\tbatch_size"] + [f"{i}\t{lr}\t{bs}" for i, (lr, bs) in enumerate(grid)]
    (folder / "grid.tsv").write_text("\n".join(lines) + "\n")
    return grid


def submit(args, train_args):
    folder = args.folder.resolve()
    if (folder / "grid.tsv").exists():
        raise SweepError(f"{folder}: already holds a sweep; choose another folder")
    grid = write_grid(folder, args.lr, args.batch_size)
    for task in range(len(grid)):  # each element logs into its own run folder
        (folder / f"task-{task}").mkdir()
    env = dict(os.environ, DISTNN_SWEEP=str(folder), DISTNN_HOME=str(HOME),
               DISTNN_PYTHON=os.environ.get("DISTNN_PYTHON", sys.executable))
    command = ["sbatch", "--parsable", f"--array=0-{len(grid) - 1}", f"--ntasks={args.ntasks}",
               f"--output={folder}/task-%a/job.out", *args.sbatch_arg, str(SBATCH), *train_args]
    if args.wait:
        command.insert(1, "--wait")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise SweepError("sbatch not found: is this a Slurm login node?") from None
    if done.returncode != 0:
        raise SweepError(f"sbatch failed: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    return f"submitted {len(grid)} settings as job array {job}; results in {folder}"


def collect(folder):
    grid_file = folder / "grid.tsv"
    if not grid_file.exists():
        raise SweepError(f"{folder}: no grid.tsv; is this a sweep folder?")
    rows = []
    for line in grid_file.read_text().splitlines()[1:]:
        task, lr, batch = line.split("\t")
        row = {"task": int(task), "lr": float(lr), "batch_size": int(batch), "status": "missing"}
        summary = folder / f"task-{task}" / "summary.json"
        if summary.exists():
            data = json.loads(summary.read_text())
            row.update({k: data.get(k) for k in ("test_acc", "val_acc", "train_loss", "epochs", "steps")},
                       status="done")
        elif any((folder / f"task-{task}" / name).exists() for name in ("checkpoints", "job.out")):
            row["status"] = "unfinished"
        rows.append(row)
    rows.sort(key=lambda r: (r.get("test_acc") is None, -(r.get("test_acc") or 0), r["task"]))
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    table = markdown(rows)
    (folder / "results.md").write_text(table)
    return table


FORMATS = {"lr": "{:g}", "test_acc": "{:.4f}", "val_acc": "{:.4f}", "train_loss": "{:.4f}"}


def markdown(rows):
    out = io.StringIO()
    out.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for r in rows:
        cells = ["-" if r.get(k) is None else FORMATS.get(k, "{}").format(r[k]) for k in COLUMNS]
        out.write("| " + " | ".join(cells) + " |\n")
    return out.getvalue()


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="write the grid and submit the job array")
    s.add_argument("folder", type=Path, help="sweep folder (created)")
    s.add_argument("--lr", type=lambda t: numbers(t, float), default=[0.001, 0.1, 1.0, 10.0, 100.0],
                   help="learning rates, comma-separated (default 0.001,0.1,1,10,100)")
    s.add_argument("--batch-size", type=lambda t: numbers(t, int), default=[10],
                   help="batch sizes, comma-separated (default 10)")
    s.add_argument("--ntasks", type=int, default=1, help="MPI ranks per setting (default 1)")
    s.add_argument("--sbatch-arg", action="append", default=[],
                   help="extra sbatch option, e.g. --sbatch-arg=--time=01:00:00 (repeatable)")
    s.add_argument("--wait", action="store_true", help="return when every element has finished")
    c = sub.add_parser("collect", help="tabulate the finished runs (CSV and Markdown)")
    c.add_argument("folder", type=Path, help="sweep folder")
    return p.parse_args(argv), train_args


def main(argv=None):
    args, train_args = parse_args(argv)
    action = (lambda: submit(args, train_args)) if args.command == "submit" else \
        (lambda: collect(args.folder))
    return cli("launch.sweep", action, SweepError)


if __name__ == "__main__":
    sys.exit(main())
