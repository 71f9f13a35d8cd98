"""``python -m data_prep``: write MNIST into distnn's HDF5 file (schema 2).

Sources, in order of precedence: CSV files (--train-x/--train-y/--test-x/--test-y),
--download from mirrors, --source DIR of IDX files, else the bundled MNIST.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from data_prep import BUNDLED_DIR, IDX_NAMES, schema
from data_prep.csv_source import read_csv_images, read_csv_labels
from data_prep.download import MIRRORS, download
from data_prep.idx import find_idx, read_images, read_labels, sha256_hex
from distnn.errors import NoRoom, Parser, UserError, cli
from distnn.files import NO_ROOM, reason, regular_file

DEFAULT_OUT = Path("data") / "mnist.h5"


def parse_args(argv=None):
    p = Parser(prog="python -m data_prep", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="HDF5 file to write (default: data/mnist.h5, relative to the working directory)")
    p.add_argument("--source", type=Path, default=BUNDLED_DIR,
                   help="folder holding the four IDX files, .gz or raw (default: the bundled MNIST)")
    p.add_argument("--download", action="store_true",
                   help="fetch the IDX files from --mirror URLs and verify their SHA-256 first")
    p.add_argument("--mirror", action="append", metavar="URL",
                   help="base URL to download from; repeat to try several in order "
                        f"(default: {', '.join(MIRRORS)})")
    for split in ("train", "test"):
        p.add_argument(f"--{split}-x", type=Path, metavar="CSV",
                       help=f"{split} images as CSV: 784 values per row, 0..1 or 0..255 (.gz allowed)")
        p.add_argument(f"--{split}-y", type=Path, metavar="CSV",
                       help=f"{split} labels as CSV: one label or a one-hot row of 10 per row")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p.parse_args(argv)


def load_csv(args):
    paths = {("train", "images"): args.train_x, ("train", "labels"): args.train_y,
             ("test", "images"): args.test_x, ("test", "labels"): args.test_y}
    missing = [f"--{s}-{'x' if k == 'images' else 'y'}" for (s, k), p in paths.items() if p is None]
    if missing:
        raise UserError(f"CSV input needs all four files; missing {', '.join(missing)}")
    arrays, sources = {}, {}
    for (split, kind), path in paths.items():
        reader = read_csv_images if kind == "images" else read_csv_labels
        arrays[(split, kind)], raw = reader(path, f"--{split}-{'x' if kind == 'images' else 'y'}")
        sources[(split, kind)] = (path.name, sha256_hex(raw))
    return arrays, sources


def load_idx(source_dir):
    if not os.path.isdir(source_dir):  # False, not an error, for a name too long
        try:
            os.stat(source_dir)
        except OSError as exc:
            raise UserError(f"--source {source_dir}: {reason(exc)}") from None
        raise UserError(f"--source {source_dir}: is not a folder")
    arrays, sources = {}, {}
    for key, name in IDX_NAMES.items():
        path = find_idx(source_dir, name)
        reader = read_images if key[1] == "images" else read_labels
        arrays[key], raw = reader(path)
        sources[key] = (path.name, sha256_hex(raw))
    return arrays, sources


def check_output(out, force):
    """Refuse bad output paths; return True if a good output already exists.

    Only a regular file is replaced (by a rename: :func:`distnn.files.atomic_write`);
    a folder, a FIFO or a device is refused, and so is a symlink, whose target the
    user may have meant to be written (data_prep never writes through a link, nor
    replaces one the user made with a file)."""
    regular_file(out, "--out", follow=False)
    if os.path.lexists(out) and not force:
        try:
            schema.check(out, "--out")
        except UserError:
            raise UserError(f"{out}: exists and is not a valid distnn data file; "
                            "use --force to replace it") from None
        return True
    return False


def prepare(args):
    """Run the preparation; return the message to print."""
    if check_output(args.out, args.force):
        return f"{args.out}: already prepared, kept (use --force to rebuild)"
    if any(v is not None for v in (args.train_x, args.train_y, args.test_x, args.test_y)):
        arrays, sources = load_csv(args)
    elif args.download:
        with tempfile.TemporaryDirectory() as tmp:
            download(tmp, args.mirror or MIRRORS)
            arrays, sources = load_idx(tmp)
    else:
        arrays, sources = load_idx(args.source)
    try:
        schema.write(args.out, arrays, sources)
    except OSError as exc:  # a full disk is the machine's problem (74), a bad path the user's (2)
        kind = NoRoom if exc.errno in NO_ROOM else UserError
        raise kind(f"{args.out}: cannot write: {exc.strerror or exc}") from None
    return (f"{args.out}: wrote {len(arrays[('train', 'images')])} training and "
            f"{len(arrays[('test', 'images')])} test images")


def main(argv=None):
    # bad input: one line, exit 2; a disk that is full: one line, exit 74
    return cli("data_prep", lambda: prepare(parse_args(argv)), (UserError, NoRoom))


if __name__ == "__main__":
    sys.exit(main())
