# Two commands on a fresh machine (Python 3.10+ and gcc): `make demo` and `make test`.
# Both create or reuse the project-local virtual environment $(VENV) and install what they need.

VENV ?= .venv
PYTHON ?= python3
# The local CPU build. Never leave torch unpinned here: a bare `torch` pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,mpi
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
# Reinstall when the build inputs change (the native sources included, once they exist).
STAMP := $(VENV)/.dtdispatch-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard dtdispatch/native/*.c dtdispatch/native/*.h)

.PHONY: install demo fuzz test lint clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BUILD_INPUTS) | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The main job on 2 CPU ranks: the correctness table (stock vs dtdispatch, both implementations), then the
# training throughput comparison with merged telemetry.
demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 launch/correctness.py
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 launch/throughput.py

# Differential fuzzing against stock DTensor (launch/fuzz.py): SECONDS split between 2 and 4 ranks.
SECONDS ?= 300
SEED ?= 0
fuzz: $(STAMP)
	rc=0; for n in 2 4; do $(VENV)/bin/torchrun --standalone --nproc-per-node $$n launch/fuzz.py \
	  --seconds $$(( $(SECONDS) / 2 )) --seed $(SEED) || rc=1; done; exit $$rc

# The whole suite. No -n: the multi-rank tests already keep both cores busy (see README).
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(VENV)/.dtdispatch-dev
	$(VENV)/bin/ruff check dtdispatch launch tests setup.py
	$(VENV)/bin/mypy dtdispatch

$(VENV)/.dtdispatch-dev: $(STAMP)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS),dev]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
