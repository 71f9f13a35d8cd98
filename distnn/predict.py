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
import sys
from pathlib import Path

import numpy as np

from data_prep.csv_source import read_csv_images
from data_prep.schema import IMAGE_SHAPE, PIXELS
from distnn import model
from distnn.config import DEFAULT_DATA
from distnn.data import Dataset
from distnn.errors import OutputError, Parser, UserError, cli
from distnn.plot import need_matplotlib, save_png
from distnn.rng import Stream
from distnn.files import write_whole
from distnn.rundir.modelfile import load_model

SIDE = IMAGE_SHAPE[0]


def read_pgm(path):
    """A binary (P5) or plain (P2) PGM as a 2-d array of 0..255."""
    data = Path(path).read_bytes()
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
    magic, width, height, maxval = tokens[0], *map(int, tokens[1:])
    if not 0 < maxval < 65536:
        raise ValueError(f"PGM maxval {maxval} is outside 1..65535")
    if magic == b"P5":
        kind = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
        pixels = np.frombuffer(data[pos + 1:pos + 1 + width * height * kind.itemsize], kind)
    elif magic == b"P2":
        pixels = np.array(data[pos:].split()[:width * height], dtype=np.float64)
    else:
        raise ValueError(f"not a PGM file (magic {magic!r})")
    return pixels.reshape(height, width).astype(np.float64) * (255.0 / maxval)


def read_image(path, invert):
    """A 28x28 grey image as 784 uint8 pixels, white digit on black."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".pgm", ".pnm"):
            image = read_pgm(path)
        else:
            plt = need_matplotlib()
            image = grey(plt.imread(path).astype(np.float64))
    except (OSError, ValueError, IndexError, SyntaxError) as exc:
        raise UserError(f"{path}: cannot read the image ({exc})") from None
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if image.shape != (SIDE, SIDE):
        raise UserError(f"{path}: image is {image.shape[1]}x{image.shape[0]} pixels, "
                        f"expected {SIDE}x{SIDE} like MNIST")
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
        return read_csv_images(args.csv)[0], None, None
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
    if not model_path.is_file():
        raise UserError(f"{model_path}: no such model file (train first: python -m distnn.train)")
    params, attrs = load_model(model_path)
    layers = attrs["layers"]
    if layers[0] != PIXELS:
        raise UserError(f"{model_path}: the model takes {layers[0]} inputs, but the images have "
                        f"{PIXELS} pixels (28x28)")
    images, labels, files = load_inputs(args)
    values = model.output_values(params, images, attrs["activation"], attrs["loss"])
    digit, guesses = attrs["positive_digit"], model.guess(values)
    if digit is None:
        if labels is not None and labels.max() >= layers[-1]:
            raise UserError(f"{model_path}: the model has {layers[-1]} outputs, but the data has "
                            f"labels up to {labels.max()}")
        probs, names = values, [str(k) for k in range(layers[-1])]
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
