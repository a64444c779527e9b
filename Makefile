# The two set-up commands of the README:  `make quickstart`  and  `make test`.
# Both create the virtual environment .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
# The small CPU build of torch. For CUDA, e.g.:
#   make test PIP_TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PIP_TORCH ?= torch==2.13.0

BIN := $(VENV)/bin

.PHONY: quickstart test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PIP_TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# The main job: a small study on a local Ray (MLflow in ./mlflow.db), then its report in reports/quickstart/.
quickstart: install
	$(BIN)/nem-study run studies/quickstart.yaml
	$(BIN)/nem-study report studies/quickstart.yaml

# Changes nothing outside the clone (.ci/run installs the system tools some tests use; without
# them those tests skip and say why).
test: install
	$(BIN)/python -m pytest
