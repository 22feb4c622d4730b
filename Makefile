# One command for each thing a newcomer does. Everything runs in ./.venv, created on first use.
#   make run     the app on http://localhost:8501 (embedded PostgreSQL unless DATABASE_URL is set)
#   make test    ruff + the whole test suite (needs Chromium: see README)
#   make train   train models/model.pth (MNIST from MNIST_DIR, or downloaded into data/mnist)
#   make bench   the benchmark table
#   make screenshots  the README's pictures of the app (docs/screenshots/, needs Chromium)
# Outside this project's CI machines, PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# keeps pip from downloading the CUDA build of torch on Linux.

PYTHON ?= python3
VENV ?= .venv
PIP_ARGS ?=
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: run test lint format train bench screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt requirements-local.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(PIP_ARGS) -r requirements-local.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-local.txt requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet $(PIP_ARGS) -r requirements-local.txt -r requirements-dev.txt
	touch $@

# Ctrl-C stops the app, then the embedded PostgreSQL (if DATABASE_URL and POSTGRES_HOST are
# unset): the shell catches the interrupt (`:`), so it lives on to run the second command.
run: $(VENV)/.runtime
	@trap : INT TERM; $(BIN)/streamlit run app.py --server.port $(PORT) --server.headless true; \
	$(BIN)/python db.py stop-embedded

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: $(VENV)/.runtime
	$(BIN)/python train.py --download

bench: $(VENV)/.dev
	$(BIN)/python -m lab.bench

screenshots: $(VENV)/.dev
	$(BIN)/python -m lab.screenshots

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
