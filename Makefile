# Two entry points: `make repro` (the whole DVC pipeline) and `make test` (the test suite).
# Both create .venv with pip on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

# A new venv takes about 6.2 GB, most of it torch 2.14.1 and its CUDA libraries: an install that cannot finish is
# refused before it starts, with the space measured on the disk the venv goes to.
VENV_NEEDS_GB := 7
FREE_GB = $(shell df -Pk "$(dir $(abspath $(VENV)))" 2>/dev/null | awk 'NR == 2 {printf "%d", $$4 / 1048576}')
NO_SPACE = echo "error: the disk filled up while installing into $(VENV), which needs about $(VENV_NEEDS_GB) GB; free some space and run make again" >&2

.PHONY: repro test lint venv clean-reports lab

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || [ -z "$(FREE_GB)" ] || [ "$(FREE_GB)" -ge $(VENV_NEEDS_GB) ] || { echo "error: the venv needs about $(VENV_NEEDS_GB) GB free on the disk of $(abspath $(VENV)), and $(FREE_GB) GB are free; free some space, or put the venv on a larger disk: make VENV=/larger/disk/kdrepro-venv $(or $(MAKECMDGOALS),venv)" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing kdrepro and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	$(BIN)/python -m pip install -e ".[dev]" > $(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; ! grep -q "No space left on device" $(VENV)/install.log || $(NO_SPACE); exit 1; }
	$(BIN)/python -c "import kdrepro, torch, torchvision, hydra, dvc, papermill, nbconvert, seaborn"
	touch $(STAMP)

# Stages run side by side, one per core (the embedded profile trains with one thread per process): `kdrepro launch`
# runs every ready stage as `dvc repro --single-item <stage>`, so dvc.lock ends as a sequential `dvc repro` leaves it.
# `make repro WORKERS=1` runs one stage at a time; on a GPU machine set WORKERS to the number of GPUs.
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)

repro: $(STAMP)
	$(BIN)/kdrepro validate --params params.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/kdrepro launch --executor local --workers $(WORKERS)
	@echo "reports: $(CURDIR)/reports/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kdrepro tests benchmarks

# Explore the notebooks: JupyterLab from the repository root with this venv's kernel; every notebook in notebooks/
# reads the tables `make repro` wrote (the profile of params.yaml unless its parameters cell says otherwise).
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir="$(CURDIR)" notebooks/matched.ipynb
