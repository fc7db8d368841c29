# The few commands a user runs. Each one creates (once) and reuses a local virtual environment.
#
#   make demo    set everything up and run the main job
#   make test    set everything up and run the whole test suite, then the torchvision comparisons
#   make book    build the book and serve it on http://127.0.0.1:8000
#
# Torch is installed first, so that the package's own `torch` requirement is already met and
# pip never pulls a different build. Override it for your machine, for example:
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
#   make test TORCH= VENV_FLAGS=--system-site-packages   (reuse the torch already installed)
#
# The tests marked `torchvision` compare with torchvision, which the package does not depend on.
# They skip in .venv; `make test` then runs them in a second environment, .venv-tv (TV_VENV),
# made once with a torch and torchvision that pip installs together (TORCH_VISION_PAIR: CUDA
# builds here, 5.7 GB, that also run on a CPU), with MRCNN_REQUIRE_TORCHVISION=1, under which
# such a test fails instead of skipping. Where that pair cannot be installed, name one that
# can, or leave the second run out (the comparisons then only skip):
#   make test TORCH_VISION_PAIR="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
#   make test TORCH_VISION_PAIR=           (no second run)
#   make test-torchvision                  (the second run alone)

PYTHON     ?= python3
VENV       ?= .venv
TORCH      ?= torch==2.13.0
VENV_FLAGS ?=
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

TV_VENV           ?= .venv-tv
TORCH_VISION_PAIR ?= torch==2.14.1 torchvision==0.29.1
TV_PY             := $(TV_VENV)/bin/python
TV_STAMP          := $(TV_VENV)/.installed
TV_RUN            := $(if $(strip $(TORCH_VISION_PAIR)),$(TV_STAMP))

.PHONY: demo test test-torchvision book book-build notebooks clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q $(TORCH); fi
	$(PY) -m pip install -q -e ".[test,docs]"
	touch $(STAMP)

$(TV_STAMP): pyproject.toml
	test -x $(TV_PY) || $(PYTHON) -m venv $(TV_VENV)
	$(TV_PY) -m pip install -q --upgrade pip
	$(TV_PY) -m pip install -q $(TORCH_VISION_PAIR)
	$(TV_PY) -m pip install -q -e ".[test,docs]"   # as in $(VENV): pytest collects every test module
	touch $(TV_STAMP)

demo: $(STAMP)
	$(PY) -m mrcnn demo --output-dir runs/demo

test: $(STAMP) $(TV_RUN)
	$(PY) -m pytest
	$(if $(TV_RUN),MRCNN_REQUIRE_TORCHVISION=1 $(TV_PY) -m pytest -m torchvision)

test-torchvision: $(TV_STAMP)
	MRCNN_REQUIRE_TORCHVISION=1 $(TV_PY) -m pytest -m torchvision

book-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

book: $(STAMP)
	$(VENV)/bin/mkdocs serve

notebooks: $(STAMP)
	$(VENV)/bin/jupytext --set-kernel python3 --to ipynb book/*.py

clean:
	rm -rf $(VENV) $(TV_VENV) site runs
