"""``python -m distnn.plot RUN_DIR [RUN_DIR ...]``: learning curves as a PNG.

Three panels, as in the source report's figures 2.1-2.3: accuracy, quadratic
cost and cross-entropy per epoch (epoch 0: the initial parameters), for the
validation and test sets, plus the training accuracy (running over each
epoch). Several runs share one figure, one colour each, labelled by the
settings that differ between them: the comparison figure of a learning-rate or
batch-size sweep. Needs ``pip install 'distnn[plot]'``.
"""

import argparse
import json
import sys
from pathlib import Path

from data_prep.files import atomic_write, reason
from distnn.errors import cli

PANELS = (("acc", "accuracy"), ("quadratic_cost", "quadratic cost"),
          ("cross_entropy", "cross-entropy cost"))
SPLITS = (("train", "-"), ("val", "--"), ("test", ":"))
FIGSIZE, DPI = (15, 4.5), 100  # 1500 x 450 pixels
LABEL_KEYS = ("lr", "batch_size", "layers", "activation", "loss", "positive_digit", "dtype",
              "seed")


class PlotError(Exception):
    """A user-facing problem; printed as one line."""


def need_matplotlib():
    """pyplot with a file-only backend, or PlotError naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed; install the plot extra: "
                        "pip install 'distnn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def load_run(folder):
    """(metrics records, config dict) of a run folder."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not folder.is_dir():
        raise PlotError(f"{folder}: no such run folder")
    if not metrics.exists():
        raise PlotError(f"{folder}: no metrics.jsonl (not a distnn run folder, or no epoch finished)")
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    except json.JSONDecodeError as exc:
        raise PlotError(f"{folder}: unreadable metrics or config ({exc})") from None
    if not records:
        raise PlotError(f"{metrics}: holds no epochs yet")
    return records, config


def run_labels(folders, configs):
    """Each run's name, plus the settings that differ between the runs."""
    differing = [k for k in LABEL_KEYS if len({json.dumps(c.get(k)) for c in configs}) > 1]
    labels = []
    for folder, config in zip(folders, configs):
        parts = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                 for k in differing for v in [config.get(k)]]
        labels.append(Path(folder).name + (f" ({', '.join(parts)})" if parts else ""))
    return labels


def plot(folders, out):
    plt = need_matplotlib()
    from matplotlib.ticker import MaxNLocator
    runs = [load_run(f) for f in folders]
    labels = run_labels(folders, [config for _, config in runs])
    fig, axes = plt.subplots(1, len(PANELS), figsize=FIGSIZE, dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((records, _), label) in enumerate(zip(runs, labels)):
        colour = colours[i % len(colours)]
        for ax, (key, title) in zip(axes, PANELS):
            for split, style in SPLITS:
                points = [(r["epoch"], r[f"{split}_{key}"]) for r in records if f"{split}_{key}" in r]
                if points:
                    ax.plot(*zip(*points), style, color=colour, marker=".",
                            label=f"{label} {split}")
            ax.set_title(f"{title} vs epoch")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out)
    return out


def save_png(fig, path):
    """Write the figure to ``path`` whole or not at all (PlotError naming it), and close it."""
    plt = need_matplotlib()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {reason(exc)}") from None
    finally:
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distnn.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", type=Path,
                   help="PNG to write (default: RUN_DIR/curves.png for one run, "
                        "comparison.png in the working directory for several)")
    args = p.parse_args(argv)
    out = args.out or (args.runs[0] / "curves.png" if len(args.runs) == 1 else Path("comparison.png"))
    return cli("distnn.plot", lambda: f"wrote {plot(args.runs, out)}", PlotError)


if __name__ == "__main__":
    sys.exit(main())
