# fedmeta — set up, run, test.
#   make run    set up a virtual environment, run the default simulation, write its report
#   make test   set up and run ruff (lint and format check), mypy (strict on policies/ and fedmeta/audit/) and the whole test suite
#   make test-fast   the inner loop: skips tests marked slow, deploy or browser
#   both run the tests on PYTEST_WORKERS=2 processes (pytest-xdist, a module's tests on one
#   of them: its module-scoped runs are made once; long modules first); PYTEST_WORKERS=0: in this process
#
# torch is installed first, on its own, so the build is an install-time choice:
#   TORCH_SPEC=torch==2.13.0  (default) on a CPU-only machine whose pip finds the local
#                             CPU wheel; from PyPI on Linux the same pin is a CUDA build
#   make run TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
#                             to pick a CUDA build explicitly on a GPU machine

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
STAMP := $(VENV)/.fedmeta-installed

# Bytecode: pip does not compile every installed module up front (torch alone has thousands
# that are never imported); Python writes each module's bytecode when it is first imported,
# also where the environment sets PYTHONDONTWRITEBYTECODE (it would make every process
# compile torch and Opacus from source again).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup run test test-fast browser nginx clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile $(TORCH_SPEC)
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	touch $(STAMP)

run: setup
	$(BIN)/fedmeta simulate --out runs/demo --overwrite
	$(BIN)/fedmeta report runs/demo --format html --out runs/demo/report.html

# the report tests open the HTML report in headless Chromium (Debian's package)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core; \
	  else echo "install Debian's chromium package (sudo apt-get install chromium) for the report tests"; exit 1; fi; }

# the deployment test puts Debian's nginx in front of the SuperLink (coordinator kit)
nginx:
	@command -v nginx >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; \
	  else echo "install Debian's nginx package (sudo apt-get install nginx-light) for the deployment test"; exit 1; fi; }

test: setup browser nginx
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy policies fedmeta/audit
	$(PYTEST)

test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy policies fedmeta/audit
	$(PYTEST) -m "not slow and not deploy and not browser"

clean:
	rm -rf runs .pytest_cache .ruff_cache
