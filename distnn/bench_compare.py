"""distnn beside PyTorch in :mod:`distnn.bench`: the trainer a user would otherwise pick.

The same network (784-256-10 sigmoid, softmax + cross-entropy), the same
initial parameters, global batch, optimizer (SGD, momentum 0.9 in PyTorch's
form, which is distnn's) and learning-rate schedule (:mod:`distnn.schedule`
itself), on the same training and test images, one thread per process: in
one process, and under DistributedDataParallel over gloo with the same
process counts as distnn's ranks, each process taking its share of every
global batch. It reports samples/s (the median window, as for distnn) and the
seconds of training, evaluations included, until the test accuracy first
reaches the target, next to distnn's own trainer run the same way.

PyTorch is optional (never needed to train or test): the launcher uses this
interpreter when it imports torch, or another one given with ``--torch``
(a virtual environment with torch and numpy), and is skipped with its reason
otherwise. The worker (``python -m distnn.bench_compare``) needs only numpy,
torch and :mod:`distnn.schedule`; the data come as an ``.npz`` file (no pickle).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from distnn.errors import UserError
from distnn.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]


def torch_python(choice):
    """(interpreter, None) for PyTorch's runs, or (None, the reason to skip them) with
    ``auto`` or ``off``; UserError when the interpreter named cannot import torch."""
    if choice == "off":
        return None, "--torch off"
    python = sys.executable if choice == "auto" else choice
    try:
        done = subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=300)
    except OSError as exc:
        raise UserError(f"--torch {choice}: {exc.strerror or exc}") from None
    if done.returncode == 0:
        return python, None
    if choice != "auto":
        raise UserError(f"--torch {choice}: this interpreter cannot import torch")
    return None, f"PyTorch is not installed for {python}"


def write_data(path, data, params):
    """The training and test rows and the initial parameters as an .npz for the workers."""
    train = data.get("train", np.arange(data.size("train")))
    test = data.get("test", np.arange(data.size("test")))
    np.savez(path, train_x=train[0], train_y=train[1], test_x=test[0], test_y=test[1],
             **{f"W{i}": W for i, (W, _) in enumerate(params)},
             **{f"b{i}": b for i, (_, b) in enumerate(params)})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(python, processes, npz, recipe, task, timeout=900):
    """Run the worker in ``processes`` processes (DDP over gloo when more than one) on
    loopback; return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
            str(ROOT), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(processes)}
        command = [python, "-m", "distnn.bench_compare", "--data", str(npz), "--task", task,
                   "--result", str(result), "--recipe", json.dumps(recipe)]
        procs = [subprocess.Popen(command, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(processes)]
        outcomes = [p.communicate(timeout=timeout) for p in procs]
        failed = [(p.returncode, err) for p, (_, err) in zip(procs, outcomes) if p.returncode]
        if failed:
            raise RuntimeError(f"PyTorch's {processes}-process run failed: {failed[0][1][-2000:]}")
        return json.loads(result.read_text())


def first_at(epochs, target):
    """(epoch, seconds) of the first epoch record whose test accuracy reaches ``target``,
    or (None, None)."""
    hit = next((e for e in epochs if e.get("epoch") and e["test_acc"] >= target), None)
    return (hit["epoch"], hit["elapsed_s"]) if hit else (None, None)


def distnn_accuracy(mpirun, processes, data, target):
    """distnn's default run as the README starts it (``mpirun -n P python -m distnn.train``):
    (first epoch at ``target``, its elapsed_s, the test accuracy after the last epoch)."""
    from distnn.rundir import read_metrics
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        done = subprocess.run([mpirun, "-n", str(processes), sys.executable, "-m",
                               "distnn.train", "--data", str(data), "--out", str(run), "--quiet"],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"distnn's {processes}-rank run failed: {done.stderr[-2000:]}")
        records, _ = read_metrics(run)
    return (*first_at(records, target), records[-1]["test_acc"])


def side_by_side(python, mpirun, data_path, npz, recipe, processes, rounds):
    """Throughput and time to the recipe's target accuracy of distnn and PyTorch at each
    process count, the runs alternating round by round; JSON-ready."""
    report = {"target": recipe["target"], "rows": []}
    results = {}
    for _ in range(rounds):
        for p in processes:
            results.setdefault(("distnn", p), []).append(
                distnn_accuracy(mpirun, p, data_path, recipe["target"]))
            if python:
                results.setdefault(("pytorch", p), []).append(
                    (launch(python, p, npz, recipe, "throughput")["samples_per_s"],
                     *first_at(launch(python, p, npz, recipe, "accuracy")["epochs"],
                               recipe["target"])))
    for (trainer, p), runs in results.items():
        if trainer == "distnn":
            epochs, seconds = [r[0] for r in runs], [r[1] for r in runs if r[1] is not None]
            row = {"final_test_acc": runs[0][2]}
        else:
            epochs, seconds = [r[1] for r in runs], [r[2] for r in runs if r[2] is not None]
            row = {"samples_per_s": statistics.median(r[0] for r in runs)}
        report["rows"].append({"trainer": trainer, "processes": p, **row,
                               "epoch": epochs[0], "seconds": statistics.median(seconds)
                               if seconds else None, "rounds": len(runs)})
    return report


def markdown(report, distnn_samples, skipped):
    """The side-by-side table; ``distnn_samples``: {ranks: samples/s} from the bench."""
    target = f"{report['target']:.1%}"
    lines = ["", f"**distnn beside PyTorch** (same network, initial parameters, batch, "
             f"momentum SGD and schedule; one thread per process; time to {target} test "
             "accuracy is training seconds with evaluations, medians of "
             f"{report['rows'][0]['rounds']} alternating round(s)):", "",
             f"| trainer | processes | samples/s | first epoch at {target} | seconds to it |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        samples = row.get("samples_per_s") or distnn_samples.get(row["processes"])
        name = "distnn" if row["trainer"] == "distnn" else \
            ("PyTorch" if row["processes"] == 1 else "PyTorch DDP (gloo)")
        seconds = f"{row['seconds']:.2f} s" if row["seconds"] is not None else "not reached"
        lines.append(f"| {name} | {row['processes']} | "
                     f"{f'{samples:,.0f}' if samples else '—'} | {row['epoch'] or '—'} | {seconds} |")
    if skipped:
        lines += ["", f"PyTorch skipped: {skipped}."]
    return "\n".join(lines) + "\n"


# ---- the worker: one PyTorch process ----

def network(torch, arrays):
    """784-256-10 sigmoid/linear layers holding distnn's initial parameters."""
    layers, n = [], sum(1 for k in arrays.files if k.startswith("W"))
    for i in range(n):
        W, b = arrays[f"W{i}"], arrays[f"b{i}"]
        linear = torch.nn.Linear(*W.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            linear.bias.copy_(torch.from_numpy(b))
        layers += [linear] + ([torch.nn.Sigmoid()] if i < n - 1 else [])
    return torch.nn.Sequential(*layers)


def worker(args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=size)
    recipe = types.SimpleNamespace(**json.loads(args.recipe))
    arrays = np.load(args.data, allow_pickle=False)
    X = torch.from_numpy(arrays["train_x"].astype(np.float32) / np.float32(255))
    y = torch.from_numpy(arrays["train_y"])
    test_x = torch.from_numpy(arrays["test_x"].astype(np.float32) / np.float32(255))
    test_y = torch.from_numpy(arrays["test_y"])
    net = network(torch, arrays)
    model = torch.nn.parallel.DistributedDataParallel(net) if size > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    batch, steps_per_epoch = recipe.batch_size, -(-len(X) // recipe.batch_size)
    rates = Schedule.of(recipe, steps_per_epoch)
    lo, hi = rank * batch // size, (rank + 1) * batch // size  # this process's share

    def step(positions, t):
        for group in opt.param_groups:
            group["lr"] = rates.rate(t)
        mine = positions[lo * len(positions) // batch:hi * len(positions) // batch]
        loss = torch.nn.functional.cross_entropy(model(X[mine]), y[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def order(epoch):
        return torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))

    if args.task == "throughput":
        positions, windows = order(1), []
        for repeat in range(recipe.repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            for s in range(recipe.steps):
                step(positions[(s * batch) % (len(X) - batch):][:batch], s)
                if (s + 1) % recipe.window == 0:
                    if size > 1:
                        dist.barrier()
                    if repeat:
                        windows.append(time.perf_counter() - start)
                    start = time.perf_counter()
        result = {"samples_per_s": recipe.window * batch / statistics.median(windows)}
    else:
        result, elapsed, t = {"epochs": []}, 0.0, 0
        for epoch in range(1, recipe.epochs + 1):
            start, positions = time.perf_counter(), order(epoch)
            for s in range(steps_per_epoch):
                step(positions[s * batch:(s + 1) * batch], t)
                t += 1
            with torch.no_grad():
                acc = float((net(test_x).argmax(1) == test_y).double().mean())
            elapsed += time.perf_counter() - start
            result["epochs"].append({"epoch": epoch, "test_acc": acc, "elapsed_s": elapsed})
            if acc >= recipe.target:
                break
    if rank == 0:
        result["torch"] = torch.__version__
        Path(args.result).write_text(json.dumps(result))
    if size > 1:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distnn.bench_compare",
                                description="one PyTorch process of distnn.bench's comparison")
    p.add_argument("--data", required=True, help=".npz written by distnn.bench")
    p.add_argument("--task", choices=["throughput", "accuracy"], required=True,
                   help="samples/s over timed windows, or epochs until the target accuracy")
    p.add_argument("--recipe", required=True, help="the settings as a JSON object")
    p.add_argument("--result", required=True, help="where rank 0 writes its JSON result")
    worker(p.parse_args(argv))


if __name__ == "__main__":
    main()
