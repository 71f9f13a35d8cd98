"""``python -m distnn.plot RUN_DIR [RUN_DIR ...]``: learning curves as a PNG.

Six panels, 1500 x 900 pixels, for the validation and test sets plus the
training accuracy (running over each epoch). Top row, as in the source
report's figures 2.1-2.3: the accuracy per epoch, zoomed to epochs 1 onward
(epoch 0, the initial parameters near 0.1, would flatten every later curve),
then the quadratic cost and the cross-entropy per epoch from epoch 0. Bottom
row: the error (1 - accuracy, in percent, on a log scale; an error of 0 is
drawn at 0.01 %) per epoch and per second since training started, to compare
runs on different rank counts by time; and the learning rate at each epoch's
last step (log scale when it decays over more than a factor of 20). A dashed
grey line marks --target (accuracy 0.98, i.e. 2 % error, by default; 0: none).
Several runs share one figure, one colour each, labelled by the settings that
differ between them, the rank count included: the comparison figure of a
sweep. A run folder whose files are not a run's (a record that is not a JSON object
with a whole-number epoch, a drawn value that is not a finite number, settings that
are not a JSON object, a FIFO, a symlink) is refused with one line naming the file
and the line. Needs ``pip install 'distnn[plot]'``.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from distnn import rundir
from distnn.errors import Parser, UserError, cli
from distnn.files import atomic_write, reason

COSTS = (("quadratic_cost", "quadratic cost"), ("cross_entropy", "cross-entropy cost"))
SPLITS = (("train", "-"), ("val", "--"), ("test", ":"))
FIGSIZE, DPI = (15, 9), 100  # 1500 x 900 pixels
LABEL_KEYS = ("ranks", "lr", "batch_size", "momentum", "nesterov", "weight_decay", "schedule",
              "warmup", "decay_every", "decay_factor", "epochs", "layers", "activation", "loss",
              "positive_digit", "dtype", "seed")
TARGET = 0.98  # the default --target accuracy
ERROR_FLOOR = 0.01  # percent: where an error of 0 (accuracy 1.0) is drawn on the log scale
REFERENCE = {"color": "grey", "linestyle": "--", "linewidth": 1}
# the values drawn: each must be null or a finite number where a record holds it (the
# trainer never records NaN or infinity: a run that diverges ends before its record)
PLOTTED = ("elapsed_s", "lr", *(f"{split}_{key}" for split, _ in SPLITS
                                 for key in ("acc", *(key for key, _ in COSTS))))


def need_matplotlib():
    """pyplot with a file-only backend, or UserError naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed; install the plot extra: "
                        "pip install 'distnn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def load_run(folder):
    """(metrics records, settings) of a run folder: its config plus "ranks", the rank count."""
    records, config = rundir.read_metrics(folder, numbers=PLOTTED)
    return records, {**config, "ranks": rank_count(folder, records)}


def rank_count(folder, records):
    """The last record's "ranks", else summary.json's "world_size" (older runs), else None."""
    ranks = [r["ranks"] for r in records if r.get("ranks") is not None]
    if ranks:
        return ranks[-1]
    return (rundir.read_summary(folder) or {}).get("world_size")


def run_labels(folders, configs):
    """Each run's name, plus the settings that differ between the runs."""
    differing = [k for k in LABEL_KEYS if len({json.dumps(c.get(k)) for c in configs}) > 1]
    labels = []
    for folder, config in zip(folders, configs):
        parts = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                 for k in differing for v in [config.get(k)]]
        labels.append(Path(folder).name + (f" ({', '.join(parts)})" if parts else ""))
    return labels


def error_pct(accuracy):
    """1 - accuracy in percent, at least ERROR_FLOOR (a log scale has no 0)."""
    return max(100 * (1 - accuracy), ERROR_FLOOR)


def draw(ax, records, x, y, *style, transform=float, **kwargs):
    """Plot y against x over the records holding both (y through ``transform``), if any."""
    pairs = [(r[x], transform(r[y])) for r in records
             if r.get(x) is not None and r.get(y) is not None]
    if pairs:
        ax.plot(*zip(*pairs), *style, marker=".", **kwargs)
    return [value for _, value in pairs]


def log_ticks(value, _):
    """Tick labels on a log axis: 1, 2 and 5 times a power of ten (plainly), the rest blank."""
    return f"{value:g}" if round(value / 10 ** math.floor(math.log10(value))) in (1, 2, 5) else ""


def figure(folders, target=TARGET):
    """The learning-curves Figure of the run folders (see the module docstring)."""
    if not 0 <= target < 1:
        raise UserError(f"--target {target:g} is not an accuracy in [0, 1) (0: no target line)")
    plt = need_matplotlib()
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
    runs = [load_run(f) for f in folders]
    labels = run_labels(folders, [config for _, config in runs])
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    (acc_ax, *cost_axes), (err_ax, time_ax, lr_ax) = axes
    for ax in (err_ax, time_ax):
        ax.set_yscale("log")
        ax.set_ylabel("error (%)")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    zoomed, rates = [], []
    for i, ((records, _), label) in enumerate(zip(runs, labels)):
        colour = colours[i % len(colours)]
        later = [r for r in records if r["epoch"] >= 1] or records  # epoch 0 only: draw it
        for split, style in SPLITS:
            acc = f"{split}_acc"
            zoomed += draw(acc_ax, later, "epoch", acc, style, color=colour)
            for ax, (key, _) in zip(cost_axes, COSTS):
                draw(ax, records, "epoch", f"{split}_{key}", style, color=colour)
            draw(err_ax, records, "epoch", acc, style, color=colour, transform=error_pct)
            draw(time_ax, records, "elapsed_s", acc, style, color=colour, transform=error_pct)
        rates += draw(lr_ax, records, "epoch", "lr", color=colour)
    if zoomed:
        margin = max(0.05 * (max(zoomed) - min(zoomed)), 0.002)
        acc_ax.set_ylim(min(zoomed) - margin, max(zoomed) + margin)
    if rates and min(rates) > 0 and max(rates) / min(rates) > 20:
        lr_ax.set_yscale("log")
    notes = [(ax, note) for ax, note in ((time_ax, "no elapsed_s in these records"), (
        lr_ax, "no learning rate in these records\n(older runs did not log it)")) if not ax.lines]
    if target:
        acc_ax.axhline(target, **REFERENCE, label=f"target {target:g}")
        err_ax.axhline(error_pct(target), **REFERENCE)
        time_ax.axhline(error_pct(target), **REFERENCE)
    for ax in (err_ax, time_ax, lr_ax):  # log ticks: 1, 2, 5 (only 1 over 3 decades or more)
        if ax.get_yscale() == "log":
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(FuncFormatter(log_ticks))
            ax.yaxis.set_minor_formatter(FuncFormatter(log_ticks) if high < 1000 * low else NullFormatter())
    titles = [(acc_ax, "accuracy vs epoch (from epoch 1)", "epoch"),
              *[(ax, f"{title} vs epoch", "epoch") for ax, (_, title) in zip(cost_axes, COSTS)],
              (err_ax, "error vs epoch (log scale)", "epoch"),
              (time_ax, "error vs time (log scale)", "seconds since training started"),
              (lr_ax, "learning rate at each epoch's last step", "epoch")]
    for ax, title, xlabel in titles:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if xlabel == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, note in notes:
        ax.set(xticks=[], yticks=[])
        ax.text(0.5, 0.5, note, ha="center", va="center", color="grey", transform=ax.transAxes)
    legend(fig, labels, colours, target)
    return fig


def legend(fig, labels, colours, target):
    """One legend below the panels: a colour per run, a line style per split, the target."""
    from matplotlib.lines import Line2D
    keys = [Line2D([], [], color=colours[i % len(colours)], marker=".")
            for i in range(len(labels))]
    keys += [Line2D([], [], color="black", linestyle=style) for _, style in SPLITS]
    texts = [*labels, "train (running over the epoch)", "validation", "test"]
    if target:
        keys.append(Line2D([], [], **REFERENCE))
        texts.append(f"target {target:g}")
    columns = 3 if max(map(len, texts)) < 60 else 2
    rows = -(-len(texts) // columns)
    fig.legend(keys, texts, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.025 * rows + 0.01, 1, 1))


def plot(folders, out, target=TARGET):
    """Write the figure of the run folders to ``out``; returns ``out``."""
    save_png(figure(folders, target), out)
    return out


def save_png(fig, path):
    """Write the figure to ``path`` whole or not at all (UserError naming it), and close it."""
    plt = need_matplotlib()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {reason(exc)}") from None
    finally:
        plt.close(fig)


def parse_args(argv):
    p = Parser(prog="python -m distnn.plot", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", type=Path,
                   help="PNG to write (default: RUN_DIR/curves.png for one run, "
                        "comparison.png in the working directory for several)")
    p.add_argument("--target", type=float, default=TARGET, metavar="ACC",
                   help=f"accuracy marked by a dashed line on the accuracy and error panels "
                        f"(default {TARGET}, i.e. {error_pct(TARGET):g} %% error; 0: none)")
    return p.parse_args(argv)


def main(argv=None):
    def action():
        args = parse_args(argv)
        out = args.out or (args.runs[0] / "curves.png" if len(args.runs) == 1
                           else Path("comparison.png"))
        return f"wrote {plot(args.runs, out, args.target)}"
    return cli("distnn.plot", action, UserError)


if __name__ == "__main__":
    sys.exit(main())
