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

`trained_shapes_model()` returns the `shapes_small` model of the demo (`make demo` writes
`runs/demo/train/checkpoint.pt`) when it is there. On a fresh checkout it trains one instead,
briefly (a fixed number of steps with a fixed seed, on generated shapes images, about half a
minute on one idle CPU thread), and keeps it in `runs/book/` so that the next chapter reuses
it. Such a short run finds where the shapes are, but scores them low and often names the
wrong class; the demo's ten minutes do much better.
"""

from __future__ import annotations

import inspect
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
from mrcnn.train import TrainSettings, train


def repository_root() -> Path:
    """The checkout this file belongs to: the folder that holds `book/`, `mrcnn/` and `pyproject.toml`.

    Found from this module's own path, so it does not depend on the folder a chapter runs in.
    Raises `FileNotFoundError` if this file has been copied out of its checkout.
    """
    root = Path(__file__).resolve().parents[1]
    missing = [name for name in ("pyproject.toml", "mrcnn/__init__.py", "book") if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"{Path(__file__).name} is not in the book/ folder of a checkout: {root} has no {', '.join(missing)}")
    return root


DEMO_CHECKPOINT = repository_root() / "runs" / "demo" / "train" / "checkpoint.pt"
BOOK_RUNS = repository_root() / "runs" / "book"

# The short run of a fresh checkout: 300 images seen once, one per step. Measured with one thread
# on a 2-core CPU shared with other jobs (load average 8-9): 56 s of training (about 20 s of CPU
# time); on the first 60 held-out images box AP 0.04 (AP50 0.15) and mask AP 0.07 (AP50 0.18),
# against the demo's 0.72 and 0.67. 500 steps gave 0.07 and 0.08 for 98 s: not worth the wait.
BOOK_TRAINING = {"num_images": 300, "iterations": 300, "batch_size": 1, "lr": 0.02, "seed": 0}


def source(obj) -> str:
    """The source code of a function, class or module, dedented."""
    return textwrap.dedent(inspect.getsource(obj))


def show_source(*objects) -> None:
    """Display the source of each object as a highlighted Python block in a notebook.

    Outside a notebook (plain `python book/chapter.py`) it prints the code instead.
    """
    text = "\n\n".join(source(obj) for obj in objects)
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(f"```python\n{text}\n```"))


def _load(path: Path):
    """The `MaskRCNN` of a training checkpoint, in evaluation mode, and the steps it was trained."""
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, path).eval(), checkpoint["step"]


def trained_shapes_model(demo_checkpoint: str | os.PathLike | None = DEMO_CHECKPOINT,
                         cache_dir: str | os.PathLike = BOOK_RUNS, num_images: int = BOOK_TRAINING["num_images"],
                         iterations: int = BOOK_TRAINING["iterations"], batch_size: int = BOOK_TRAINING["batch_size"],
                         lr: float = BOOK_TRAINING["lr"], seed: int = BOOK_TRAINING["seed"]):  # fmt: skip
    """A `shapes_small` Mask R-CNN trained on the synthetic shapes, in evaluation mode; prints where it came from.

    1. the demo's model, when `demo_checkpoint` exists (None: never);
    2. else the book's own, when `cache_dir` holds one trained with these settings;
    3. else it trains one: `iterations` SGD steps of `batch_size` images drawn from `num_images`
       generated shapes images (`ShapesDataset`, seed `seed`), the paper's warm-up and momentum
       at rate `lr`, and keeps it in `cache_dir`, written atomically (a temporary folder, then a
       rename), so that an interrupted run never leaves half a file for the next chapter.

    The defaults are a compromise between a chapter that runs in a minute and a model that
    detects something: BOOK_TRAINING records what they cost and give.
    """
    if demo_checkpoint is not None and Path(demo_checkpoint).is_file():
        model, steps = _load(Path(demo_checkpoint))
        print(f"the demo's model: {steps} steps, {demo_checkpoint}")
        return model
    if min(num_images, iterations, batch_size) < 1 or num_images < batch_size:
        raise ValueError(f"need num_images >= batch_size >= 1 and iterations >= 1, got num_images={num_images}, "
                         f"batch_size={batch_size}, iterations={iterations}")  # fmt: skip
    cache_dir = Path(cache_dir)
    cached = cache_dir / f"shapes_small_{num_images}images_{iterations}x{batch_size}_lr{lr:g}_seed{seed}.pt"
    if cached.is_file():
        try:
            model, steps = _load(cached)
            print(f"the book's model, trained earlier: {steps} steps of {batch_size} images, {cached}")
            return model
        except CheckpointError as error:  # written by another version of the library: train again
            print(f"cannot use {cached} ({error}); training again")

    settings = TrainSettings(iterations=iterations, batch_size=batch_size, lr=lr, decay_steps=(round(0.8 * iterations),),
                             warmup_iterations=max(1, iterations // 10), clip_grad_norm=10.0, seed=seed,
                             checkpoint_every=iterations)  # fmt: skip
    dataset = ShapesDataset(num_images, seed=seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".training-", dir=cache_dir))
    try:
        with torch.random.fork_rng():  # the caller's random state is left as it was
            torch.manual_seed(seed)
            model = MaskRCNN(shapes_small(ShapesDataset.num_classes))
            started = time.perf_counter()
            train(model, dataset, settings, work, progress=False,
                  metadata={"category_names": list(ShapesDataset.category_names)})  # fmt: skip
        os.replace(work / "checkpoint.pt", cached)  # atomic: the whole file or the previous state
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"no demo model ({demo_checkpoint}): trained one for {iterations} steps of {batch_size} images "
          f"in {time.perf_counter() - started:.0f} s, kept in {cached}")  # fmt: skip
    return model.eval()
