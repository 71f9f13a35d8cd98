"""``python -m distnn.predict``: predicted digits from a trained model, with pictures.

  python -m distnn.predict --model runs/a/model.h5                 # the test set of --data
  python -m distnn.predict --model runs/a/model.h5 --show 12       # + digits.png, confusion.png
  python -m distnn.predict --model runs/a/model.h5 --images my7.png another.pgm
  python -m distnn.predict --model runs/a/model.h5 --csv TestDigitX.csv.gz

Predictions go to a gzip'd CSV (default: predictions.csv.gz beside the model),
one predicted label per line in input order (like the source report's
PredictDigitY.csv.gz); with --probabilities each line is the label followed by
the ten output values. A model trained on one digit against the rest
(``--positive-digit D``) predicts 1 (digit D) or 0 (another digit), and its one
output value is the probability of D. For the test set the accuracy is printed; it equals the
run's reported test accuracy: each image's outputs have the same bits
wherever and with whichever images they are computed. Images must be 28x28 (PNG or PGM);
a light background is inverted to MNIST's white-on-black unless --no-invert.
Pictures and PNG input need ``pip install 'distnn[plot]'``.
"""

import argparse
import gzip
import io
import struct
import sys
from pathlib import Path

import numpy as np

from data_prep.csv_source import read_csv_images
from data_prep.schema import IMAGE_SHAPE, PIXELS
from distnn import model
from distnn.config import DEFAULT_DATA
from distnn.data import Dataset
from distnn.errors import OutputError, Parser, UserError, cli
from distnn.files import regular_file, write_whole
from distnn.plot import need_matplotlib, save_png
from distnn.rng import Stream
from distnn.rundir.modelfile import load_model

SIDE = IMAGE_SHAPE[0]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_size(width, height):
    """UserError unless an image's header declares MNIST's 28x28: checked before its
    pixels are decoded, so a huge image is refused without decoding it."""
    if (width, height) != (SIDE, SIDE):
        raise UserError(f"image is {width}x{height} pixels, expected {SIDE}x{SIDE} like MNIST")


def read_png(data):
    """A PNG's pixels as grey levels 0..255 (:func:`grey`)."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image (nor named .pgm)")
    check_size(*struct.unpack(">II", data[16:24]))
    plt = need_matplotlib()
    return grey(plt.imread(io.BytesIO(data), format="png").astype(np.float64))


def read_pgm(data):
    """A binary (P5) or plain (P2) PGM as a 2-d array of 0..255: its size and maximum
    value checked from the header first, then every pixel against that maximum."""
    tokens, pos = [], 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    magic = tokens[0]
    if magic not in (b"P2", b"P5"):
        raise ValueError(f"not a PGM file (magic {magic!r})")
    width, height, maxval = (whole_number(t, "PGM header value") for t in tokens[1:])
    check_size(width, height)
    if not 0 < maxval < 65536:
        raise ValueError(f"PGM maxval {maxval} is outside 1..65535")
    count = width * height
    if magic == b"P5":
        kind = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
        pixels = np.frombuffer(data[pos + 1:pos + 1 + count * kind.itemsize], kind)
    else:
        pixels = np.array([whole_number(t, "P2 pixel") for t in data[pos:].split()[:count]])
    if len(pixels) < count:
        raise ValueError(f"holds {len(pixels)} pixels; its header declares {width}x{height}")
    outside = pixels[(pixels < 0) | (pixels > maxval)]
    if outside.size:
        raise ValueError(f"pixel value {outside[0]} is outside 0..{maxval} (the PGM maxval)")
    return pixels.reshape(height, width).astype(np.float64) * (255.0 / maxval)


def whole_number(token, what):
    """A PGM token as an int; ValueError naming it otherwise (nan, inf, 1.5)."""
    if not token.isdigit():
        raise ValueError(f"{what} {token.decode(errors='replace')!r} is not a whole number")
    return int(token)


def read_image(path, invert):
    """A 28x28 grey image as 784 uint8 pixels, white digit on black."""
    path = Path(path)
    regular_file(path, "--images")
    try:
        data = path.read_bytes()
        image = read_pgm(data) if path.suffix.lower() in (".pgm", ".pnm") else read_png(data)
    except (OSError, ValueError, IndexError, SyntaxError) as exc:
        raise UserError(f"{path}: cannot read the image ({exc})") from None
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if image.max() - image.min() < 1:
        raise UserError(f"{path}: the image is blank (one grey level{alpha_note(path)}); "
                        "nothing to recognise")
    if invert == "auto" and image.mean() > 127:
        image = 255.0 - image
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).reshape(PIXELS)


def grey(image):
    """A PNG's pixels (matplotlib's 0..1 floats, or integers) as grey levels 0..255, any
    transparency composited over white, as a viewer shows the image on a light page."""
    image = image * 255.0 if image.max() <= 1.0 else image
    if image.ndim == 2:
        return image
    colour, alpha = (image[..., :-1], image[..., -1:] / 255.0) if image.shape[-1] in (2, 4) \
        else (image, 1.0)
    return (colour * alpha + 255.0 * (1 - alpha)).mean(axis=-1)


def alpha_note(path):
    return " after compositing its transparency over white" if Path(path).suffix.lower() == ".png" else ""


def load_inputs(args):
    """(uint8 images, labels or None, names) from the chosen source."""
    if args.images:
        images = np.stack([read_image(p, args.invert) for p in args.images])
        return images, None, [str(p) for p in args.images]
    if args.csv:
        regular_file(args.csv, "--csv")
        return read_csv_images(args.csv)[0], None, None
    regular_file(args.data, "--data")
    data = Dataset(args.data, stream=True)  # reads (and checks) only the test rows
    try:
        images, labels = data.get("test", np.arange(data.size("test")))
    finally:
        data.close()
    if not len(images):
        raise UserError(f"{args.data}: holds no test images to predict; give --images or --csv")
    return images, labels, None


def write_predictions(path, guesses, values, with_probabilities):
    lines = [str(g) if not with_probabilities else
             ",".join([str(g)] + [f"{v:.6g}" for v in row]) for g, row in zip(guesses, values)]
    def write(tmp):
        with gzip.open(tmp, "wt") as f:
            f.write("\n".join(lines) + "\n")
    write_whole(path, write)


def show_digits(path, images, labels, captions, probs, guesses, names, count, seed):
    """A grid of digits, each beside a bar chart of its class probabilities (``names``),
    marked CORRECT/INCORRECT against ``labels`` and titled with ``captions``."""
    plt = need_matplotlib()
    pick = np.sort(Stream(seed).choice(len(images), min(count, len(images))))
    cols = min(4, len(pick))
    rows = -(-len(pick) // cols)
    fig = plt.figure(figsize=(4 * cols, 2.4 * rows), dpi=100)
    grid = fig.add_gridspec(rows, 2 * cols, width_ratios=[1, 1.4] * cols)
    for k, i in enumerate(pick):
        r, c = divmod(k, cols)
        guess = int(guesses[i])
        ok = labels is None or guess == labels[i]
        image_ax, bar_ax = fig.add_subplot(grid[r, 2 * c]), fig.add_subplot(grid[r, 2 * c + 1])
        image_ax.imshow(images[i].reshape(SIDE, SIDE), cmap="Greys_r")
        image_ax.set_xticks([])
        image_ax.set_yticks([])
        truth = "" if labels is None else f"label {captions[i]}\n"
        image_ax.set_title(f"{truth}{'CORRECT' if ok else 'INCORRECT'}" if labels is not None
                           else f"#{i}", color="g" if ok else "r", fontsize=9, fontweight="bold")
        bar_ax.bar(range(probs.shape[1]), probs[i], color=["g" if ok else "r" if j == guess else "C0"
                                                            for j in range(probs.shape[1])])
        bar_ax.set_xticks(range(probs.shape[1]), names)
        bar_ax.tick_params(labelsize=7)
        bar_ax.set_ylim(0, 1)
        bar_ax.set_title(f"guess {names[guess]}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def show_confusion(path, labels, guesses, names):
    plt = need_matplotlib()
    classes = len(names)
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels, guesses), 1)
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    shown = ax.imshow(matrix, cmap="Blues")
    for (r, c), n in np.ndenumerate(matrix):
        ax.text(c, r, str(n), ha="center", va="center", fontsize=7,
                color="white" if n > matrix.max() / 2 else "black")
    ax.set_xticks(range(classes), names)
    ax.set_yticks(range(classes), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title(f"confusion matrix ({(guesses == labels).mean():.2%} correct)")
    fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    save_png(fig, path)


def run(args):
    model_path = Path(args.model)
    if not model_path.exists():
        raise UserError(f"{model_path}: no such model file (train first: python -m distnn.train)")
    params, attrs = load_model(model_path)
    images, labels, files = load_inputs(args)
    with np.errstate(all="ignore"):  # overflow to NaN or infinity is reported below
        values = model.output_values(params, images, attrs["activation"], attrs["loss"])
    broken = np.count_nonzero(~np.isfinite(values).all(axis=1))
    if broken:
        raise UserError(f"--model {model_path}: its outputs are NaN or infinite for {broken} of "
                        f"the {len(values)} images (weights too large to compute with)")
    digit, guesses = attrs["positive_digit"], model.guess(values)
    if digit is None:
        probs, names = values, [str(k) for k in range(values.shape[1])]
        captions = labels
    else:  # one digit against the rest: classes "not D" (0) and "D" (1)
        probs = np.column_stack([1 - values[:, 0], values[:, 0]])
        names = [f"not {digit}", str(digit)]
        captions = None if labels is None else [
            str(d) if d == digit else f"{d} (not {digit})" for d in labels]
        labels = None if labels is None else model.task_labels(labels, digit)
    out = Path(args.out) if args.out else model_path.parent / "predictions.csv.gz"
    write_predictions(out, guesses, values, args.probabilities)
    lines = [f"wrote {len(guesses)} predictions to {out}"]
    if files:
        lines += [f"{name}: {names[g]} ({probs[i, g]:.3f})"
                  for i, (name, g) in enumerate(zip(files, guesses))]
    if labels is not None:
        lines.append(f"accuracy {np.mean(guesses == labels):.4f} on {len(labels)} test images")
    if args.show:
        folder = out.parent
        show_digits(folder / "digits.png", images, labels, captions, probs, guesses, names,
                    args.show, args.seed)
        lines.append(f"wrote {folder / 'digits.png'}")
        if labels is not None:
            show_confusion(folder / "confusion.png", labels, guesses, names)
            lines.append(f"wrote {folder / 'confusion.png'}")
    return "\n".join(lines)


def non_negative(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parse_args(argv):
    p = Parser(prog="python -m distnn.predict", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model.h5 written by distnn.train")
    p.add_argument("--data", default=DEFAULT_DATA, help="prepared HDF5 file whose test set to predict")
    p.add_argument("--images", nargs="+", metavar="FILE", help="28x28 PNG or PGM images to predict")
    p.add_argument("--csv", help="CSV of images to predict (784 values per row, 0..1 or 0..255)")
    p.add_argument("--out", help="predictions file (default: predictions.csv.gz beside the model)")
    p.add_argument("--probabilities", action="store_true",
                   help="write the output values after each label")
    p.add_argument("--show", type=non_negative, default=0, metavar="N",
                   help="save N digits with their output bar charts (digits.png) and a "
                        "confusion matrix (confusion.png) beside the predictions")
    p.add_argument("--seed", type=int, default=0, help="which digits --show picks (default 0)")
    p.add_argument("--no-invert", dest="invert", action="store_const", const="no", default="auto",
                   help="do not invert images with a light background")
    return p.parse_args(argv)


def main(argv=None):
    return cli("distnn.predict", lambda: run(parse_args(argv)), (UserError, OutputError, OSError))


if __name__ == "__main__":
    sys.exit(main())
