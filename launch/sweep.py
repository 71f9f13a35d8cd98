"""``python -m launch.sweep``: grid searches over distnn.train's settings as a Slurm job array.

  python -m launch.sweep submit sweeps/m --momentum 0.8,0.9,0.95 --lr 0.3,1,1.5 -- --epochs 10
  python -m launch.sweep collect sweeps/m

``submit`` sweeps the cartesian product of the settings named (comma-separated
values; the first setting in ``submit --help`` varies slowest), checks every point
with distnn.train's own checks, writes ``grid.tsv`` (``task``, then a column per
swept setting) and submits ``launch/slurm/sweep.sbatch`` as an array, one element
per line, training into ``task-<i>`` with the arguments after ``--``. ``collect``
tabulates the elements' ``summary.json`` into ``results.csv`` and ``results.md``,
best test accuracy first, and prints the table.
"""

import argparse
import csv
import io
import itertools
import os
import re
import shutil
import stat
import subprocess
import sys
from contextlib import redirect_stdout, suppress
from pathlib import Path

from distnn import config, rundir
from distnn.errors import Parser, UserError, cli
from distnn.files import atomic_write, reason

HOME = Path(__file__).resolve().parents[1]
SBATCH = HOME / "launch" / "slurm" / "sweep.sbatch"
RESULTS = ("test_acc", "val_acc", "train_loss", "epochs", "steps", "status")
SCORES = ("test_acc", "val_acc", "train_loss")  # a summary's numbers; epochs, steps: counts
SWITCH = {"off": False, "on": True}


def switch(text):
    if text not in SWITCH:
        raise ValueError("values must be off or on")
    return text


# The sweepable settings, in grid order: name (as in grid.tsv), type of a value, metavar, help.
SETTINGS = (
    ("lr", float, "LR,...", "learning rates (the schedule's peak), e.g. 0.1,1,1.5"),
    ("batch_size", int, "N,...", "global batch sizes, e.g. 32,64"),
    ("momentum", float, "MU,...", "momentum values, each 0 <= MU < 1, e.g. 0,0.9"),
    ("nesterov", switch, "off,on", "without and with Nesterov momentum (needs --momentum > 0)"),
    ("weight_decay", float, "LAMBDA,...", "L2 weight decays, each >= 0, e.g. 0,1e-4"),
    ("schedule", str, "NAME,...", "learning-rate schedules: constant, step, cosine"),
    ("warmup", float, "E,...", "linear warm-up lengths in epochs, each >= 0, e.g. 0,0.5,1"),
    ("decay_every", float, "E,...", "epochs between decays (--schedule step), e.g. 2,5"),
    ("decay_factor", float, "GAMMA,...", "decay factors (--schedule step), each 0 < GAMMA <= 1"),
)



def listed(kind):
    """An argparse type: a comma-separated list of distinct values of ``kind``."""
    def parse(text):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            why = exc.args[0] if kind is switch else "not a comma-separated list of " + \
                ("whole numbers" if kind is int else "numbers")
            raise argparse.ArgumentTypeError(f"{text!r}: {why}")
        if not values or len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: give distinct values, comma-separated")
        return values
    return parse


def flag(name):
    return "--" + name.replace("_", "-")


def train_flags(names, point):
    """distnn.train flags for one grid point (as sweep.sbatch builds them from grid.tsv)."""
    out = []
    for name, value in zip(names, point):
        out += [flag(name)] if value == "on" else [] if value == "off" else [flag(name), str(value)]
    return out


def make_grid(chosen):
    """(names, points): the swept settings and the cartesian product of their values."""
    names = [name for name, *_ in SETTINGS if chosen.get(name)]
    if not names:
        raise UserError("name at least one setting to sweep, e.g. --lr 0.1,1")
    return names, list(itertools.product(*(chosen[name] for name in names)))


def check_grid(names, points, train_args):
    """Every point's full distnn.train arguments through its own flag checks."""
    parser = config.build_parser()
    for point in points:
        where = "grid point " + " ".join(f"{n}={v}" for n, v in zip(names, point))
        try:
            with redirect_stdout(io.StringIO()):  # --help after -- prints nothing
                parsed = parser.parse_args(train_flags(names, point) + train_args)
            config.from_args(parsed)
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removesuffix(' (see --help)')}") from None
        except SystemExit:  # --help after --: it would print help, not train
            raise UserError("the arguments after -- ask for help, not a run: see "
                             "python -m distnn.train --help") from None
        for name, value in zip(names, point):  # a repeat after -- would win over the grid's
            if getattr(parsed, name) != SWITCH.get(value, value):
                raise UserError(f"{flag(name)} is swept: do not give it after --")


def write_grid(folder, names, points):
    """The sweep folder: ``task-<i>`` for each point (each element's run folder), then
    ``grid.tsv``. Nothing is left behind when a write fails (UserError naming it).
    Returns the folders it made, the deepest first (the sweep folder and its parents)."""
    made = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for task in range(len(points)):
            (folder / f"task-{task}").mkdir()
        lines = ["\t".join(["task", *names])]
        lines += ["\t".join(map(str, [task, *point])) for task, point in enumerate(points)]
        write_text(folder / "grid.tsv", "\n".join(lines) + "\n")
    except OSError as exc:
        remove_grid(folder, len(points), made)
        raise UserError(f"cannot write the sweep into {folder}: {reason(exc)}") from None
    return made


def remove_grid(folder, n_points, made):
    """Undo :func:`write_grid` (a sweep that was not submitted): its files, then the
    folders it ``made`` (only while empty)."""
    with suppress(OSError):
        (folder / "grid.tsv").unlink()
    for task in range(n_points):
        with suppress(OSError):
            (folder / f"task-{task}").rmdir()
    for path in made:
        with suppress(OSError):
            path.rmdir()


def write_text(path, text):
    """``text`` written whole into ``path`` (never through a symlink placed there)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def check_new_folder(folder):
    """UserError unless ``folder`` is an empty folder or can be created (as far as a
    look tells: not under a file, nor a name too long)."""
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{folder}: cannot create it: {reason(exc)}") from None
    if not stat.S_ISDIR(mode):
        raise UserError(f"{folder}: is a file, not a folder")
    if os.path.lexists(folder / "grid.tsv"):
        raise UserError(f"{folder}: already holds a sweep; choose another folder")
    if any(folder.iterdir()):
        raise UserError(f"{folder}: is not empty; choose a new or empty folder")


def submit(args, train_args):
    folder = args.folder.resolve()
    check_new_folder(folder)
    if args.ntasks < 1:
        raise UserError(f"--ntasks must be at least 1, got {args.ntasks}")
    names, points = make_grid(vars(args))
    check_grid(names, points, train_args)
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: is this a Slurm login node?")
    made = write_grid(folder, names, points)
    env = dict(os.environ, DISTNN_SWEEP=str(folder), DISTNN_HOME=str(HOME),
               DISTNN_PYTHON=os.environ.get("DISTNN_PYTHON", sys.executable))
    command = ["sbatch", "--parsable", f"--array=0-{len(points) - 1}", f"--ntasks={args.ntasks}",
               f"--output={folder}/task-%a/job.out", *args.sbatch_arg, str(SBATCH), *train_args]
    if args.wait:
        command.insert(1, "--wait")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if not done.stdout.strip():  # nothing submitted: leave nothing behind
            remove_grid(folder, len(points), made)
        raise UserError(f"sbatch failed: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    return f"submitted {len(points)} settings as job array {job}; results in {folder}"


def read_grid(folder):
    """(column names, [{name: value} for each task]) of the sweep's grid.tsv, blank lines
    left out; UserError naming the file, and the line, when it is not a grid."""
    path = folder / "grid.tsv"
    data = rundir.read_bytes(path)
    if data is None:
        raise UserError(f"{folder}: no grid.tsv; is this a sweep folder?")
    lines = [(number, line) for number, line in enumerate(rundir.utf8(data, path).split("\n"), 1)
             if line.strip()]
    if not lines:
        raise UserError(f"{path}: is empty; launch.sweep submit writes a header and a line per task")
    (number, header), *lines = lines
    names = header.split("\t")  # task, then the swept settings (lr, batch_size before v2)
    if names[0] != "task":
        raise UserError(f"{path} line {number}: the header does not start with the task column")
    points = []
    for number, line in lines:
        point = dict(zip(names, line.split("\t")))
        if not re.fullmatch(r"[0-9]{1,9}", point["task"]):
            raise UserError(f"{path} line {number}: task {point['task'][:40]!r} is not an array "
                            "task number (0, 1, ...)")
        points.append(point)
    return names, points


def results(summary, path):
    """The RESULTS a summary holds; UserError naming ``path`` for one that is not a
    finite number (a score) or a whole number (a count), or null."""
    found = {k: summary.get(k) for k in RESULTS[:-1]}
    for key, value in found.items():
        kinds = (int, float) if key in SCORES else (int,)
        if value is not None and not (type(value) in kinds and abs(value) <= rundir.LARGEST):
            raise UserError(f"{path}: {key} {rundir.shown(value)} is not a "
                            f"{'finite' if key in SCORES else 'whole'} number")
    return found


def collect(folder):
    names, points = read_grid(folder)
    rows = []
    for point in points:
        row = {**point, "task": int(point["task"]), "status": "missing"}
        run = folder / f"task-{row['task']}"
        summary = rundir.read_summary(run)
        if summary is not None:
            row.update(results(summary, run / rundir.SUMMARY), status="done")
        elif rundir.started(run) or (run / "job.out").exists():
            row["status"] = "unfinished"
        rows.append(row)
    rows.sort(key=lambda r: (r.get("test_acc") is None, -(r.get("test_acc") or 0), r["task"]))
    columns = names + list(RESULTS)
    spreadsheet = io.StringIO(newline="")
    writer = csv.DictWriter(spreadsheet, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in columns} for r in rows)
    table = markdown(rows, columns)
    for name, text in (("results.csv", spreadsheet.getvalue()), ("results.md", table)):
        try:
            write_text(folder / name, text)
        except OSError as exc:
            raise UserError(f"cannot write {folder / name}: {reason(exc)}") from None
    return table


def markdown(rows, columns):
    formats = dict.fromkeys(("test_acc", "val_acc", "train_loss"), "{:.4f}")
    out = io.StringIO()
    out.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    for r in rows:
        cells = ["-" if r.get(k) is None else formats.get(k, "{}").format(r[k]) for k in columns]
        out.write("| " + " | ".join(cells) + " |\n")
    return out.getvalue()


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, train_args = argv[:cut], argv[cut + 1:]
    p = Parser(prog="python -m launch.sweep", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="check the grid, write it and submit the job array",
                       description="Sweep the settings named (comma-separated values each); "
                                   "arguments after -- go to every distnn.train.")
    s.add_argument("folder", type=Path, help="sweep folder (created; must not hold a sweep)")
    settings = s.add_argument_group("settings to sweep (name at least one)")
    for name, kind, metavar, text in SETTINGS:
        settings.add_argument(flag(name), type=listed(kind), metavar=metavar, help=text)
    s.add_argument("--ntasks", type=int, default=1, help="MPI ranks per grid point (default 1)")
    s.add_argument("--sbatch-arg", action="append", default=[],
                   help="extra sbatch option, e.g. --sbatch-arg=--time=01:00:00 (repeatable)")
    s.add_argument("--wait", action="store_true", help="return when every element has finished")
    c = sub.add_parser("collect", help="tabulate the finished runs (CSV and Markdown)")
    c.add_argument("folder", type=Path, help="sweep folder")
    return p.parse_args(argv), train_args


def main(argv=None):
    def action():
        args, train_args = parse_args(argv)
        return submit(args, train_args) if args.command == "submit" else collect(args.folder)
    return cli("launch.sweep", action, UserError)


if __name__ == "__main__":
    sys.exit(main())
