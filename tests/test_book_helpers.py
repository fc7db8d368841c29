"""book/book_helpers.py: the checkout the chapters read from, and the trained model they share
(the demo's, or a short run kept in a cache).

The helper is the book's, not the library's: it is loaded here from its file, as a chapter
imports it from its own folder.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mrcnn.checkpoint import load_checkpoint, save_checkpoint
from mrcnn.config import shapes_small
from mrcnn.model import MaskRCNN

ROOT = Path(__file__).resolve().parents[1]


def load_helpers(path: Path = ROOT / "book" / "book_helpers.py", name: str = "book_helpers"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: inspect.getsource finds the module by name
    spec.loader.exec_module(module)
    return module


book_helpers = load_helpers()
source, trained_shapes_model = book_helpers.source, book_helpers.trained_shapes_model

TINY_RUN = {"num_images": 4, "iterations": 2, "batch_size": 2}  # two steps: what matters is where the model goes


def assert_same_weights(model, other):
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_source_is_the_real_code():
    assert source(trained_shapes_model).startswith("def trained_shapes_model(")


def test_the_repository_root_is_the_checkout_whatever_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert book_helpers.repository_root() == ROOT
    assert (book_helpers.repository_root() / "experiments" / "results").is_dir()
    assert book_helpers.DEMO_CHECKPOINT == ROOT / "runs" / "demo" / "train" / "checkpoint.pt"


def test_a_helper_copied_out_of_its_checkout_says_so(tmp_path):
    (tmp_path / "book").mkdir()
    shutil.copy(ROOT / "book" / "book_helpers.py", tmp_path / "book" / "book_helpers.py")
    try:
        with pytest.raises(FileNotFoundError, match="pyproject.toml, mrcnn/__init__.py"):
            load_helpers(tmp_path / "book" / "book_helpers.py", "copied_book_helpers")
    finally:
        sys.modules.pop("copied_book_helpers", None)


def test_the_demos_checkpoint_is_used_when_it_exists(tmp_path, capsys):
    torch.manual_seed(1)
    demo = MaskRCNN(shapes_small())
    save_checkpoint(tmp_path / "demo" / "checkpoint.pt", demo, demo.config, step=1500)
    model = trained_shapes_model(tmp_path / "demo" / "checkpoint.pt", cache_dir=tmp_path / "book", **TINY_RUN)
    assert "the demo's model: 1500 steps" in capsys.readouterr().out
    assert not model.training
    assert_same_weights(model, demo)
    assert not (tmp_path / "book").exists()  # nothing trained, nothing cached


def test_without_the_demo_it_trains_once_then_reuses_the_cache(tmp_path, capsys):
    before = torch.get_rng_state()
    model = trained_shapes_model(tmp_path / "missing.pt", cache_dir=tmp_path / "book", **TINY_RUN)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    out = capsys.readouterr().out
    assert "trained one for 2 steps of 2 images" in out
    cached = list((tmp_path / "book").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".pt", cached  # the checkpoint only: no temporary folder left
    assert load_checkpoint(cached[0])["step"] == 2
    assert not model.training

    torch.manual_seed(0)
    untrained = MaskRCNN(shapes_small())  # the run starts from these weights (seed 0) and moves away from them
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, untrained.state_dict()[k])]
    assert any(k.startswith("box_branch") for k in changed) and any(k.startswith("mask_branch") for k in changed)

    again = trained_shapes_model(tmp_path / "missing.pt", cache_dir=tmp_path / "book", **TINY_RUN)
    assert "trained earlier: 2 steps" in capsys.readouterr().out
    assert_same_weights(again, model)

    other = trained_shapes_model(None, cache_dir=tmp_path / "book", **{**TINY_RUN, "iterations": 1})
    assert "trained one for 1 steps" in capsys.readouterr().out  # other settings, another cache entry
    assert len(list((tmp_path / "book").iterdir())) == 2
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())


def test_an_unreadable_cache_is_trained_again(tmp_path, capsys):
    trained_shapes_model(None, cache_dir=tmp_path, **{**TINY_RUN, "iterations": 1})
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"half a file")
    capsys.readouterr()
    trained_shapes_model(None, cache_dir=tmp_path, **{**TINY_RUN, "iterations": 1})
    out = capsys.readouterr().out
    assert "cannot use" in out and "trained one for 1 steps" in out
    assert load_checkpoint(cached)["step"] == 1


@pytest.mark.parametrize("bad", [{"iterations": 0}, {"batch_size": 0}, {"num_images": 1, "batch_size": 2}])
def test_bad_settings_raise_a_value_error(tmp_path, bad):
    with pytest.raises(ValueError, match="num_images >= batch_size >= 1 and iterations >= 1"):
        trained_shapes_model(None, cache_dir=tmp_path, **{**TINY_RUN, **bad})
