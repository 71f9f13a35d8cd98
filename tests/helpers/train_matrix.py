"""Train every hidden activation x loss x dtype, and each optimizer setting, on a small
data file, in this process;
print one JSON object: {name: [params_sha256, per-epoch metrics without timings]}.

    python tests/helpers/train_matrix.py DATA.h5 OUT_DIR [--blas-threads N] [--gemm NAME]

Run under different environments (numpy's SIMD paths switched off, another
numpy, more BLAS threads), the printed objects must be equal. ``--gemm``
swaps the exact products' GEMM for one with another summation order.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import run_result  # noqa: E402

from distnn import compiled, numerics, products, train  # noqa: E402
from distnn.config import Config  # noqa: E402

ACTIVATIONS = ("sigmoid", "tanh", "relu", "elu", "softplus")
LOSSES = {"ce": dict(layers=(784, 8, 10)), "mse": dict(layers=(784, 8, 10)),
          "bce": dict(layers=(784, 8, 1), positive_digit=3)}
OPTIMIZERS = {"nesterov-cosine": dict(momentum=0.9, nesterov=True, weight_decay=1e-3,
                                      schedule="cosine", warmup=0.5),
              "momentum-step": dict(momentum=0.8, weight_decay=1e-4, schedule="step",
                                    decay_every=0.5, decay_factor=0.5, warmup=0.25)}


def reversed_gemm(a, b, out=None):
    """a @ b with the terms of every sum added last to first."""
    total = np.zeros((a.shape[0], b.shape[1]))
    for k in range(a.shape[1] - 1, -1, -1):
        total += a[:, k:k + 1] * b[k:k + 1, :]
    return result(total, out)


def blocked_gemm(a, b, out=None, block=7):
    """a @ b as a sum of partial products over blocks of 7 terms, the last block first."""
    total = np.zeros((a.shape[0], b.shape[1]))
    for k in reversed(range(0, a.shape[1], block)):
        total += a[:, k:k + block] @ b[k:k + block, :]
    return result(total, out)


def einsum_gemm(a, b, out=None):
    return result(np.einsum("ik,kj->ij", a, b), out)


def result(total, out):
    if out is None:
        return total
    out[...] = total
    return out


GEMMS = {"reversed": reversed_gemm, "blocked": blocked_gemm, "einsum": einsum_gemm}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--gemm", choices=list(GEMMS))
    p.add_argument("--dtypes", default="float32,float64")
    args = p.parse_args()
    threadpool_limits(limits=args.blas_threads, user_api="blas")
    np.seterr(all="ignore")
    if args.gemm:
        products.GEMM = GEMMS[args.gemm]
    settings = {f"{dtype}-{activation}-{loss}": dict(dtype=dtype, activation=activation,
                                                     loss=loss, **shape)
                for dtype in args.dtypes.split(",") for activation in ACTIVATIONS
                for loss, shape in LOSSES.items()}
    settings.update({f"{dtype}-sigmoid-ce-{name}": dict(dtype=dtype, **optimizer)
                     for dtype in args.dtypes.split(",") for name, optimizer in OPTIMIZERS.items()})
    results = {}
    for name, setting in settings.items():
        out = Path(args.out) / name
        cfg = Config(data=args.data, out=str(out), batch_size=40, epochs=2, val_size=40, lr=0.5,
                     quiet=True, **setting)
        train.run(cfg, MPI.COMM_SELF)
        results[name] = run_result(out)
    print(json.dumps({"numpy": np.__version__, "kernels": compiled.ACTIVE,
                      "numerics": numerics.sample_digest(),
                      "results": results}))


if __name__ == "__main__":
    main()
