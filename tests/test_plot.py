"""The learning-curves figure: which panels, on which scales, from which numbers; labels; the PNG.

The run folders are written here by hand (metrics.jsonl, config.json, summary.json),
so no training is needed.
"""

import json
import os
import struct
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT, error_line, run_env

from distnn import plot

pytest.importorskip("matplotlib")

ACCS = [0.1, 0.90, 0.93, 0.95, 0.96]  # epoch 0 (initial parameters) then epochs 1-4


def write_run(folder, accs=ACCS, ranks=None, lr=None, config=None, summary=None, seconds=10.0):
    """A run folder with one record per epoch: val/test accuracy ``accs[epoch]`` (test 0.01
    higher, at most 1), train accuracy 0.02 lower from epoch 1, costs falling with the error,
    elapsed_s ``seconds`` per epoch; "ranks" and "lr" (a function of the epoch) only if given."""
    folder.mkdir(parents=True)
    records = []
    for epoch, acc in enumerate(accs):
        record = {"epoch": epoch, "step": 10 * epoch, "elapsed_s": round(seconds * epoch, 3)}
        for split, value in (("val", acc), ("test", min(acc + 0.01, 1.0))):
            record.update({f"{split}_acc": value, f"{split}_quadratic_cost": 1 - value,
                           f"{split}_cross_entropy": 2 * (1 - value)})
        if epoch:
            record["train_acc"] = acc - 0.02
            if lr:
                record["lr"] = lr(epoch)
        if ranks is not None:
            record["ranks"] = ranks
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.json").write_text(json.dumps({"lr": 0.5, "batch_size": 64, **(config or {})}))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder, records


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def panels(fig):
    """The six axes by title: {title: Axes}."""
    return {ax.get_title(): ax for ax in fig.axes}


def data_lines(ax):
    """The curves of an axes (marked points), not the target line."""
    return [line for line in ax.lines if line.get_marker() == "."]


def legend_texts(fig):
    """The figure's one legend: a label per run, the line style of each split, the target."""
    [legend] = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; asserts the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_six_panels_log_error_and_seconds(tmp_path):
    run, records = write_run(tmp_path / "a", ranks=2, seconds=7.5)
    fig = plot.figure([run])
    ax = panels(fig)
    assert set(ax) == {"accuracy vs epoch (from epoch 1)", "quadratic cost vs epoch",
                       "cross-entropy cost vs epoch", "error vs epoch (log scale)",
                       "error vs time (log scale)", "learning rate at each epoch's last step"}
    assert tuple(fig.get_size_inches() * fig.dpi) == (1500, 900)
    assert ax["error vs epoch (log scale)"].get_yscale() == "log"
    assert ax["error vs time (log scale)"].get_yscale() == "log"
    assert ax["accuracy vs epoch (from epoch 1)"].get_yscale() == "linear"
    seconds = data_lines(ax["error vs time (log scale)"])
    assert len(seconds) == 3  # train, val, test
    val = next(line for line in seconds if line.get_linestyle() == "--")
    assert list(val.get_xdata()) == [r["elapsed_s"] for r in records] == [0, 7.5, 15, 22.5, 30]
    assert list(val.get_ydata()) == pytest.approx([100 * (1 - r["val_acc"]) for r in records])
    train = next(line for line in seconds if line.get_linestyle() == "-")
    assert list(train.get_xdata()) == [r["elapsed_s"] for r in records[1:]]  # no epoch-0 train_acc
    by_epoch = data_lines(ax["error vs epoch (log scale)"])
    assert {tuple(line.get_xdata()) for line in by_epoch} == {(0, 1, 2, 3, 4), (1, 2, 3, 4)}
    costs = data_lines(ax["quadratic cost vs epoch"])
    assert {tuple(line.get_xdata()) for line in costs} == {(0, 1, 2, 3, 4)}  # from epoch 0, as before


def test_zoomed_accuracy_leaves_out_epoch_0(tmp_path):
    run, _ = write_run(tmp_path / "a")
    acc = panels(plot.figure([run]))["accuracy vs epoch (from epoch 1)"]
    low, high = acc.get_ylim()
    drawn = [y for line in data_lines(acc) for y in line.get_ydata()]
    assert all(0 not in line.get_xdata() for line in data_lines(acc))
    assert 0.1 < low < min(drawn) == pytest.approx(0.88)
    assert max(drawn) == pytest.approx(0.97) and max(drawn) < high < 1.0
    assert high - low < 0.15  # zoomed: the later epochs fill the panel


def test_target_line_on_accuracy_and_error_panels(tmp_path):
    run, _ = write_run(tmp_path / "a", accs=[0.1, 0.95, 0.985, 0.99])
    fig = plot.figure([run])
    ax = panels(fig)
    [on_acc] = [line for line in ax["accuracy vs epoch (from epoch 1)"].lines if line not in
                data_lines(ax["accuracy vs epoch (from epoch 1)"])]
    assert list(on_acc.get_ydata()) == [0.98, 0.98] and on_acc.get_linestyle() == "--"
    for title in ("error vs epoch (log scale)", "error vs time (log scale)"):
        [line] = [l for l in ax[title].lines if l.get_marker() != "."]
        assert list(line.get_ydata()) == pytest.approx([2, 2])  # 2 % error
    assert "target 0.98" in legend_texts(fig)
    none = panels(plot.figure([run], target=0))
    assert all(line.get_marker() == "." for a in none.values() for line in a.lines)
    with pytest.raises(plot.UserError, match=r"--target 1 is not an accuracy in \[0, 1\)"):
        plot.figure([run], target=1.0)


def test_labels_tell_rank_counts_and_optimizer_settings_apart(tmp_path):
    one, _ = write_run(tmp_path / "one", ranks=1)
    two, _ = write_run(tmp_path / "two", ranks=2)
    texts = legend_texts(plot.figure([one, two]))
    assert texts[:2] == ["one (ranks=1)", "two (ranks=2)"]
    assert texts[2:5] == ["train (running over the epoch)", "validation", "test"]
    # older runs: no "ranks" in the records, summary.json's world_size instead
    old, _ = write_run(tmp_path / "old", summary={"world_size": 4})
    assert "old (ranks=4)" in legend_texts(plot.figure([one, old]))
    # same rank count: not in the labels; a differing optimizer setting is
    heavy, _ = write_run(tmp_path / "heavy", ranks=1, config={"momentum": 0.9, "nesterov": True})
    texts = legend_texts(plot.figure([one, heavy]))
    assert "one (momentum=None, nesterov=None)" in texts
    assert "heavy (momentum=0.9, nesterov=True)" in texts
    assert not any("ranks" in t for t in texts)


def test_perfect_accuracy_is_drawn_at_the_floor_without_warnings(tmp_path):
    run, _ = write_run(tmp_path / "a", accs=[0.1, 0.99, 1.0, 1.0])  # test_acc 1.0 from epoch 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot.figure([run])
        fig.canvas.draw()
    lines = data_lines(panels(fig)["error vs epoch (log scale)"])
    test = next(line for line in lines if line.get_linestyle() == ":")
    assert list(test.get_ydata()) == pytest.approx([89, plot.ERROR_FLOOR, plot.ERROR_FLOOR,
                                                    plot.ERROR_FLOOR])


def test_learning_rate_panel_and_its_absence(tmp_path):
    steps, _ = write_run(tmp_path / "steps", ranks=1, lr=lambda e: 0.5 * 0.1 ** (e - 1))
    lr = panels(plot.figure([steps]))["learning rate at each epoch's last step"]
    [line] = data_lines(lr)
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert list(line.get_ydata()) == pytest.approx([0.5, 0.05, 0.005, 0.0005])
    assert lr.get_yscale() == "log"  # decays over more than a factor of 20
    flat, _ = write_run(tmp_path / "flat", lr=lambda e: 0.5)
    assert panels(plot.figure([flat]))["learning rate at each epoch's last step"].get_yscale() == "linear"
    old, _ = write_run(tmp_path / "old")  # records from before "lr" was logged
    lr = panels(plot.figure([old]))["learning rate at each epoch's last step"]
    assert len(lr.lines) == 0 and "no learning rate" in lr.texts[0].get_text()


def test_cli_one_run_and_several(tmp_path, monkeypatch, capsys):
    a, _ = write_run(tmp_path / "a", ranks=1)
    b, _ = write_run(tmp_path / "b", ranks=2, config={"lr": 0.1})
    assert plot.main([str(a)]) == 0
    assert png_size(a / "curves.png") == (1500, 900)
    monkeypatch.chdir(tmp_path)
    assert plot.main([str(a), str(b), "--target", "0.95"]) == 0
    assert png_size(tmp_path / "comparison.png") == (1500, 900)
    import matplotlib.pyplot as plt
    assert plt.imread(tmp_path / "comparison.png").shape[:2] == (900, 1500)
    assert capsys.readouterr().out.splitlines() == [f"wrote {a / 'curves.png'}", "wrote comparison.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "comparison.png"]  # no temp files


def test_cli_errors_are_one_line(tmp_path, capsys):
    run, _ = write_run(tmp_path / "a")
    cases = [([str(run), "--target", "2"], "--target 2 is not an accuracy in [0, 1)"),
             ([str(run), "--out", str(tmp_path / "missing" / "c.png")],
              f"cannot write {tmp_path / 'missing' / 'c.png'}: No such file or directory"),
             ([str(tmp_path / "nope")], "nope: no such run folder")]
    for argv, message in cases:
        assert plot.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


GOOD = '{"epoch": 0, "val_acc": 0.1}\n'
BAD_RUNS = {  # case: (metrics.jsonl, config.json or None for none, the error after the path)
    "a list": (GOOD + "[1, 2]\n", None, "metrics.jsonl line 2: [1, 2] is not a JSON object"),
    "null": (GOOD + "\nnull\n", None, "metrics.jsonl line 3: null is not a JSON object"),
    "a number": (GOOD + "3\n", None, "metrics.jsonl line 2: 3 is not a JSON object"),
    "no epoch": (GOOD + '{"val_acc": 0.5}\n', None, "metrics.jsonl line 2: the record has no epoch"),
    "a string epoch": (GOOD + '{"epoch": "1"}\n', None,
                       'metrics.jsonl line 2: epoch "1" is not a whole number from 0 to 1e+15'),
    "epoch 1e308": (GOOD + '{"epoch": 1e308}\n', None, "line 2: epoch 1e+308 is not a whole number"),
    "a negative epoch": (GOOD + '{"epoch": -1}\n', None, "line 2: epoch -1 is not a whole number"),
    "Infinity": (GOOD + '{"epoch": 1, "lr": Infinity}\n', None, "line 2: lr Infinity is not a finite"),
    "-Infinity": (GOOD + '{"epoch": 1, "elapsed_s": -Infinity}\n', None,
                  "line 2: elapsed_s -Infinity is not a finite number"),
    "a huge cost": (GOOD + '{"epoch": 1, "val_cross_entropy": 1e308}\n', None,
                    "line 2: val_cross_entropy 1e+308 is not a finite number of at most 1e+15"),
    "a string accuracy": (GOOD + '{"epoch": 1, "test_acc": "0.9"}\n', None,
                          'line 2: test_acc "0.9" is not a finite number'),
    "not JSON": (GOOD + '{"epoch": 1,\n', None, "metrics.jsonl line 2: not JSON"),
    "nested too deeply": (GOOD + "[" * 100000 + "]" * 100000 + "\n", None,
                          "metrics.jsonl line 2: JSON nested too deeply"),
    "non-UTF-8 metrics": (GOOD.encode() + b'{"epoch": 1, "x": "\xff"}\n', None,
                          "metrics.jsonl line 2: not UTF-8 text"),
    "non-UTF-8 config": (GOOD, b'{\n"lr": "\xff"}', "config.json line 2: not UTF-8 text"),
    "config a list": (GOOD, "[1, 2]", "config.json: [1, 2] is not a JSON object of settings"),
    "config a string": (GOOD, '"lr"', 'config.json: "lr" is not a JSON object of settings'),
    "config not JSON": (GOOD, '{\n"lr": }', "config.json line 2: not JSON"),
    "metrics a folder": (None, None, "metrics.jsonl: is a folder, not a regular file"),
    "config a folder": (GOOD, True, "config.json: is a folder, not a regular file"),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_a_run_folder_that_is_not_a_run_is_one_line(tmp_path, capsys, case):
    metrics, config, message = BAD_RUNS[case]
    run = tmp_path / "run"
    run.mkdir()
    for name, content in (("metrics.jsonl", metrics), ("config.json", config)):
        if isinstance(content, (str, bytes)):
            (run / name).write_bytes(content.encode() if isinstance(content, str) else content)
        elif content is not None or name == "metrics.jsonl":
            (run / name).mkdir()
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distnn.plot: error: ") and f"{run}" in err, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "curves.png").exists()


def test_null_or_absent_values_are_no_points_but_nan_is_refused(tmp_path, capsys):
    """What the trainer writes plots: null (samples_per_s, an lr not logged yet) and no
    val_* at all (--val-size 0). It never records NaN (a run that diverges ends first):
    a NaN is not drawn as a gap but refused."""
    run, records = write_run(tmp_path / "a", ranks=1)
    lines = [json.dumps({**{k: v for k, v in r.items() if not k.startswith("val_")},
                         "samples_per_s": None, "lr": None if r["epoch"] < 2 else 0.1})
             for r in records]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n\n")
    ax = panels(plot.figure([run]))
    assert [line.get_linestyle() for line in data_lines(ax["error vs epoch (log scale)"])] == ["-", ":"]
    [lr] = data_lines(ax["learning rate at each epoch's last step"])
    assert list(lr.get_xdata()) == [2, 3, 4]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 5, "test_acc": NaN}\n')
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err == f"distnn.plot: error: {run / 'metrics.jsonl'} line 7: test_acc NaN is not a " \
                  "finite number of at most 1e+15 in size\n"


def plot_cli(*args):
    """``python -m distnn.plot args...``: in a process of its own, as a blocked open()
    would block the test too."""
    return subprocess.run([sys.executable, "-m", "distnn.plot", *map(str, args)], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", "summary.json"])
def test_a_fifo_or_symlink_in_the_run_folder_is_refused_unopened(tmp_path, name):
    """summary.json too: it is read for the rank count of records without one."""
    run, _ = write_run(tmp_path / "run", summary={"world_size": 2})
    elsewhere = tmp_path / name
    elsewhere.write_bytes((run / name).read_bytes())
    for kind in ("a FIFO", "a symbolic link"):
        (run / name).unlink()
        if kind == "a FIFO":
            os.mkfifo(run / name)
        else:
            (run / name).symlink_to(elsewhere)
        result = plot_cli(run)
        assert result.returncode == 2
        line = error_line(result)
        assert line == f"distnn.plot: error: cannot read {run / name}: is {kind}, not a regular file"
        assert not (run / "curves.png").exists()
