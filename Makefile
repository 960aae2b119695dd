# Two entry points: `make repro` (the whole DVC pipeline) and `make test` (the test suite).
# Both create .venv with pip on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: repro test lint venv clean-reports lab

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing kdrepro and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	$(BIN)/python -m pip install -e ".[dev]" > $(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	$(BIN)/python -c "import kdrepro, torch, torchvision, hydra, dvc, papermill, nbconvert, seaborn"
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/kdrepro validate --params params.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "reports: $(CURDIR)/reports/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kdrepro tests benchmarks

# Explore the notebooks: JupyterLab from the repository root with this venv's kernel; every notebook in notebooks/
# reads the tables `make repro` wrote (the profile of params.yaml unless its parameters cell says otherwise).
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir="$(CURDIR)" notebooks/matched.ipynb
