# Batch Normalization, from scratch to GPU: build the book and run the tests.
#   make book   set up .venv, generate the student notebooks with nbgrader, build the book
#   make test   set up .venv and run the whole test suite (what CI runs)
#   make publish  after `make book`: write _build/publish/, the student tree (book + notebooks, no solutions)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test release publish bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -e .
	touch $(STAMP)

release: $(STAMP)
	$(BIN)/python -m bngrade release

book: release
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/jupyter-book build . -W -n --keep-going
	@echo "Book built: open $(CURDIR)/_build/html/index.html"

publish: $(STAMP)
	$(BIN)/python -m bnpublish --site _build/html --out _build/publish

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n 2 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_batchnorm.py
	$(BIN)/python benchmarks/cpu_norms.py

clean:
	rm -rf _build autograder/course
