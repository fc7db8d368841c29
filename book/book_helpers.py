"""Helpers for the book's notebooks: show the library's real code, never a pasted copy, find
the files the chapters read, and give the chapters that look at a *trained* model (inference,
inspection) one to look at.

This is the book's tooling, not the library's: it lives next to the chapters (`book/`), knows
the checkout it sits in, and writes `runs/book/`. A chapter imports it as `book_helpers`, which
works wherever the chapter runs, because the notebook's own folder is on the import path:
Jupyter, VS Code and nbconvert start the kernel in `book/`, `python book/<chapter>.py` puts
`book/` first on `sys.path`, and the site's build runs every chapter in `book/` too
(tools/book_hooks.py). mkdocs.yml keeps this file out of the site's pages.

`repository_root()` is the checkout, found from this file's own place (never from the current
folder), so `repository_root() / "experiments" / "results" / "ablations.json"` is the same file
whichever folder a chapter runs in.

`trained_shapes_model()` returns the book's own trained `shapes_small` model, the same on every
machine: on a fresh checkout it trains one with a fixed seed on generated shapes images (the
demo's recipe, shortened: BOOK_TRAINING), and keeps it in `runs/book/` so that every later
chapter, and every later build, reuses it. The training takes a few minutes once; it is enough
for the model to find the objects of the chapters' pictures and name most of them right. The
demo's model (`make demo`) is better still, but a page that changed with whether the demo had
been run would not be a page of the book, so the chapters never read it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from IPython import get_ipython
from IPython.display import Markdown, display

from mrcnn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from mrcnn.config import shapes_small
from mrcnn.data.shapes import ShapesDataset
from mrcnn.model import MaskRCNN
from mrcnn.demo import DEMO_DEFAULTS
from mrcnn.train import TrainSettings, paper_schedule, train


def repository_root() -> Path:
    """The checkout this file belongs to: the folder that holds `book/`, `mrcnn/` and `pyproject.toml`.

    Found from this module's own path, so it does not depend on the folder a chapter runs in.
    Raises `FileNotFoundError` if this file has been copied out of its checkout.
    """
    root = Path(__file__).resolve().parents[1]
    missing = [name for name in ("pyproject.toml", "mrcnn/__init__.py", "book") if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{Path(__file__).name} is not in the book/ folder of a checkout: {root} has no {', '.join(missing)}"
        )
    return root


DEMO_CHECKPOINT = repository_root() / "runs" / "demo" / "train" / "checkpoint.pt"
BOOK_RUNS = repository_root() / "runs" / "book"

# The book's run: the demo's recipe (mrcnn/demo.py's DEMO_DEFAULTS: 2,000 images, batches of 4,
# lr 0.02 after a warm-up of 100 steps, the decay at 3/4 of the run, gradient clipping at 10),
# for 800 steps instead of 1,500, on one thread (the same bits on every run of a machine).
# Measured on the shared 2-core machine: about 200 s of training on an idle core; on the 100
# held-out images of experiments/transfer.py the same recipe gave mask AP 43.5 (box AP 45.3).
# 500 steps were not enough: the held-out picture of chapter 1 got no detection above 0.5.
BOOK_TRAINING = {"num_images": 2000, "iterations": 800, "batch_size": 4, "lr": 0.02, "seed": 0}

def source(obj, start: str | None = None, stop: str | None = None) -> str:
    """The source code of a function, class or module, dedented.

    With `start` or `stop`, only a piece of it: from the one line that holds the text `start`
    (the first line when None) to the first line from there on that holds `stop` (the last line
    when None). A marker that no line holds, or a `start` that several lines hold, is a
    `ValueError`: when the code changes, a chapter that shows a piece of it fails instead of
    showing another piece.
    """
    lines = inspect.getsource(obj).splitlines(keepends=True)
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    first, last = 0, len(lines) - 1
    if start is not None:
        found = [index for index, line in enumerate(lines) if start in line]
        if len(found) != 1:
            raise ValueError(f"{len(found)} lines of {name} hold {start!r}; a piece starts at exactly one")
        first = found[0]
    if stop is not None:
        found = [index for index in range(first, len(lines)) if stop in lines[index]]
        if not found:
            raise ValueError(f"no line of {name} from {lines[first].strip()!r} on holds {stop!r}")
        last = found[0]
    return textwrap.dedent("".join(lines[first : last + 1]))


def show_source(*objects, start: str | None = None, stop: str | None = None) -> None:
    """Display the source of each object as a highlighted Python block in a notebook.

    `start` and `stop` show a piece of one object (see `source`), for a chapter that walks
    through a long function a few lines at a time. Outside a notebook (plain
    `python book/chapter.py`) it prints the code instead.
    """
    if (start is not None or stop is not None) and len(objects) != 1:
        raise ValueError("start and stop choose a piece of one object")
    text = "\n\n".join(source(obj, start, stop) for obj in objects)
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(f"```python\n{text}\n```"))


def shown_path(path: str | os.PathLike) -> str:
    """A path as a page may print it: relative to the checkout when it lies inside it, else its name.

    A page that printed the build machine's absolute paths would say where it was built, not
    what the chapter computed.
    """
    path = Path(path).resolve()
    try:
        return path.relative_to(repository_root()).as_posix()
    except ValueError:
        return path.name


DEMO_RESULTS = repository_root() / "experiments" / "results" / "demo.json"


def demo_results() -> dict:
    """The measured demo the book quotes: `experiments/results/demo.json`, the report of one
    `make demo` run with its code commit, date and conditions ("report" holds the demo's own
    demo.json: "mask_AP" and "box_AP" in [0, 1], "seconds", "steps", "arguments").

    Every figure a chapter gives for the demo comes from here or from the demo's settings
    (`mrcnn.demo.DEMO_DEFAULTS`), never from the prose.
    """
    return json.loads(DEMO_RESULTS.read_text())


def figure_description(figure) -> str:
    """What a matplotlib figure shows, in words from its own titles: the suptitle, then each panel's
    title (or its axis labels when it has none). The site uses it as the picture's alt text."""
    parts = [figure._suptitle.get_text()] if figure._suptitle is not None else []  # noqa: SLF001
    for ax in figure.axes:
        titles = (ax.title, ax._left_title, ax._right_title)  # noqa: SLF001
        title = " ".join(t.get_text() for t in titles if t.get_text())
        if not title and (ax.get_xlabel() or ax.get_ylabel()):
            title = f"{ax.get_ylabel()} against {ax.get_xlabel()}".strip()
        if title and title not in parts:
            parts.append(title)
    return " | ".join(" ".join(part.split()) for part in parts if part.strip())


def describe_figures() -> None:
    """In a notebook, write each figure's `figure_description` into its PNG (a "Description" text chunk).

    The inline backend turns a figure into a PNG without words, and nbconvert gives every picture
    the same placeholder alt text; tools/book_hooks.py reads the chunk back into the `alt` of the
    page's `<img>`. Outside IPython it does nothing.
    """
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure  # the chapters draw with matplotlib; importing it here is cheap

    formatter = shell.display_formatter.formatters["image/png"]
    draw = formatter.lookup_by_type(Figure) if Figure in formatter.type_printers else None
    if draw is None or getattr(draw, "describes_figures", False):
        return

    def draw_with_description(figure):
        return draw(figure, metadata={"Description": figure_description(figure) or "a figure"})

    draw_with_description.describes_figures = True
    formatter.for_type(Figure, draw_with_description)


describe_figures()  # on import: every chapter imports this module in its first cell, after %matplotlib inline


def _load(path: Path):
    """The `MaskRCNN` of a training checkpoint, in evaluation mode, and the steps it was trained."""
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, path).eval(), checkpoint["step"]


def book_training_settings(
    iterations: int = BOOK_TRAINING["iterations"],
    batch_size: int = BOOK_TRAINING["batch_size"],
    lr: float = BOOK_TRAINING["lr"],
    seed: int = BOOK_TRAINING["seed"],
) -> TrainSettings:
    """The demo's recipe (`DEMO_DEFAULTS`) for `iterations` steps: the paper's schedule with its decay
    at 3/4 of the run, a warm-up of an eighth of the run (at most the demo's), clipping as the demo."""
    warmup = min(DEMO_DEFAULTS["warmup"], max(1, iterations // 8))
    return paper_schedule(batch_size, lr=lr, iterations=iterations, warmup_iterations=warmup,
                          clip_grad_norm=DEMO_DEFAULTS["clip_grad_norm"], seed=seed,
                          checkpoint_every=iterations)  # fmt: skip


def trained_shapes_model(demo_checkpoint: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike = BOOK_RUNS, num_images: int = BOOK_TRAINING["num_images"],
                         iterations: int = BOOK_TRAINING["iterations"], batch_size: int = BOOK_TRAINING["batch_size"],
                         lr: float = BOOK_TRAINING["lr"], seed: int = BOOK_TRAINING["seed"]):  # fmt: skip
    """A `shapes_small` Mask R-CNN trained on the synthetic shapes, in evaluation mode; prints where it came from.

    1. the model of `demo_checkpoint`, when given and the file exists (the chapters pass None: a
       page must not change with whether `make demo` has been run);
    2. else the book's own, when `cache_dir` holds one trained with these settings;
    3. else it trains one: `iterations` SGD steps of `batch_size` images drawn from `num_images`
       generated shapes images (`ShapesDataset`, seed `seed`), with `book_training_settings`, on
       one thread, and keeps it in `cache_dir`, written atomically (a temporary folder, then a
       rename), so that an interrupted run never leaves half a file for the next chapter.

    BOOK_TRAINING records what the defaults cost and give. Printed paths are relative to the
    checkout (`shown_path`).
    """
    if demo_checkpoint is not None and Path(demo_checkpoint).is_file():
        model, steps = _load(Path(demo_checkpoint))
        print(f"the demo's model: {steps} steps, {shown_path(demo_checkpoint)}")
        return model
    if min(num_images, iterations, batch_size) < 1 or num_images < batch_size:
        raise ValueError(f"need num_images >= batch_size >= 1 and iterations >= 1, got num_images={num_images}, "
                         f"batch_size={batch_size}, iterations={iterations}")  # fmt: skip
    cache_dir = Path(cache_dir)
    cached = cache_dir / f"shapes_small_{num_images}images_{iterations}x{batch_size}_lr{lr:g}_seed{seed}.pt"
    if cached.is_file():
        try:
            model, steps = _load(cached)
            print(f"the book's model, trained earlier: {steps} steps of {batch_size} images, {shown_path(cached)}")
            return model
        except CheckpointError as error:  # written by another version of the library: train again
            print(f"cannot use {shown_path(cached)} ({error}); training again")

    settings = book_training_settings(iterations, batch_size, lr, seed)
    dataset = ShapesDataset(num_images, seed=seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".training-", dir=cache_dir))
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():  # the caller's random state is left as it was
            torch.set_num_threads(1)  # the same sums in the same order: the same model on every run
            torch.manual_seed(seed)
            model = MaskRCNN(shapes_small(ShapesDataset.num_classes))
            started = time.perf_counter()
            train(model, dataset, settings, work, progress=False,
                  metadata={"category_names": list(ShapesDataset.category_names)})  # fmt: skip
        os.replace(work / "checkpoint.pt", cached)  # atomic: the whole file or the previous state
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    print(f"the book's model, not yet in the cache: trained one for {iterations} steps of {batch_size} images "
          f"in {time.perf_counter() - started:.0f} s, kept in {shown_path(cached)}")  # fmt: skip
    return model.eval()
