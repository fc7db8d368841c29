# The few commands a user runs. Each one creates (once) and reuses a local virtual environment.
#
#   make demo    set everything up and run the main job
#   make test    set everything up and run the whole test suite
#   make book    build the book and serve it on http://127.0.0.1:8000
#
# Torch is installed first, so that the package's own `torch` requirement is already met and
# pip never pulls a different build. Override it for your machine, for example:
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
#   make test TORCH= VENV_FLAGS=--system-site-packages   (reuse the torch already installed)

PYTHON     ?= python3
VENV       ?= .venv
TORCH      ?= torch==2.13.0
VENV_FLAGS ?=
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

.PHONY: demo test book book-build notebooks clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q $(TORCH); fi
	$(PY) -m pip install -q -e ".[test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mrcnn demo --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest

book-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

book: $(STAMP)
	$(VENV)/bin/mkdocs serve

notebooks: $(STAMP)
	$(VENV)/bin/jupytext --set-kernel python3 --to ipynb book/*.py

clean:
	rm -rf $(VENV) site runs
