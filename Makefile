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
BUILD_INPUTS := pyproject.toml setup.py $(wildcard dtdispatch/_native/*.c dtdispatch/_native/*.h)

# make compat: the suite on other torch releases, each in a venv of its own, $(COMPAT_DIR)/torch-V,
# reused when present (also one made by hand with that torch in it). Their Linux wheels are CUDA
# builds (about 5 GB each with the nvidia-* dependencies); they run on CPU.
TORCH_COMPAT ?= 2.12.1 2.14.1 2.15.0
COMPAT_DIR ?= .compat

.PHONY: install demo fuzz test lint clean compat compat-one clients clients-venvs clients-venv-one opinfo

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

# The whole suite. No -n: the multi-rank tests already keep both cores busy (see docs/TESTING.md).
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The whole OpInfo database against stock DTensor (tests/distributed/test_opinfo.py, world sizes 1
# and 2, both implementations, the path above dispatch on and off, forward and backward): per
# (op, dtype) OPINFO_SAMPLES samples, per sample OPINFO_SHARDINGS shardings; OPINFO_DTYPES (comma-
# separated, empty: every dtype of dtdispatch.testing.opinfo.DTYPES), OPINFO_FROM (an op id: resume
# there). Each op's report goes to OPINFO_LOG (JSON lines, appended: remove it for a fresh run);
# the summary per failure class is printed at the end.
OPINFO_LOG ?= opinfo.jsonl
OPINFO_SAMPLES ?= 1
OPINFO_SHARDINGS ?= 2
OPINFO_DTYPES ?=
OPINFO_FROM ?=
opinfo: $(STAMP)
	DTDISPATCH_OPINFO=all DTDISPATCH_OPINFO_LOG=$(abspath $(OPINFO_LOG)) \
	  DTDISPATCH_OPINFO_SAMPLES=$(OPINFO_SAMPLES) DTDISPATCH_OPINFO_SHARDINGS=$(OPINFO_SHARDINGS) \
	  DTDISPATCH_OPINFO_DTYPES=$(OPINFO_DTYPES) DTDISPATCH_OPINFO_FROM=$(OPINFO_FROM) \
	  $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/distributed/test_opinfo.py; \
	  rc=$$?; $(PY) -m dtdispatch.testing.opinfo $(OPINFO_LOG); exit $$rc

# Each version: venv, torch==V (skipped when it is already there), dtdispatch in editable mode from
# this checkout (redone when the checkout or its build inputs change: the stamp holds both), the
# suite into $(COMPAT_DIR)/torch-V.log; then one result line per version. Fails if any failed.
compat:
	@failed=""; for v in $(TORCH_COMPAT); do \
	  $(MAKE) --no-print-directory compat-one COMPAT_TORCH=$$v || failed="$$failed $$v"; \
	done; \
	echo "== make compat: torch $(TORCH_COMPAT) (logs in $(COMPAT_DIR)/torch-V.log)"; \
	for v in $(TORCH_COMPAT); do \
	  cat $(COMPAT_DIR)/torch-$$v.result 2>/dev/null || echo "torch $$v: FAILED before the suite ran"; \
	done; \
	test -z "$$failed"

CVENV = $(COMPAT_DIR)/torch-$(COMPAT_TORCH)
SQ := '
# PYTEST_ARGS as one single-quoted shell word, for the result line.
PYTEST_ARGS_Q = '$(subst $(SQ),$(SQ)\$(SQ)$(SQ),$(PYTEST_ARGS))'
CHECK_TORCH = $(CVENV)/bin/python -c 'import sys, torch; \
	sys.exit(torch.__version__.split("+")[0] != "$(COMPAT_TORCH)")'

compat-one:
	@test -n "$(COMPAT_TORCH)" || { echo "compat-one needs COMPAT_TORCH=V"; exit 2; }
	@rm -f $(CVENV).result
	@test -x $(CVENV)/bin/python || $(PYTHON) -m venv $(CVENV)
	@$(CHECK_TORCH) 2>/dev/null || $(CVENV)/bin/python -m pip install --quiet torch==$(COMPAT_TORCH)
	@key="$(CURDIR) $$(cat $(BUILD_INPUTS) | sha256sum | cut -c1-16)"; \
	if [ "$$(cat $(CVENV)/.dtdispatch-installed 2>/dev/null)" != "$$key" ]; then \
	  $(CVENV)/bin/python -m pip install --quiet -e '.[$(EXTRAS)]' && echo "$$key" > $(CVENV)/.dtdispatch-installed; \
	fi
	@$(CHECK_TORCH) || { echo "torch $(COMPAT_TORCH) was replaced: pyproject.toml's torch range excludes it"; exit 1; }
	@{ $(CVENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests; echo $$? > $(CVENV).rc; } 2>&1 | tee $(CVENV).log
	@rc=$$(cat $(CVENV).rc); args=$(PYTEST_ARGS_Q); \
	verdict=$$([ "$$rc" = 0 ] && echo PASSED || echo "FAILED (pytest exit $$rc)"); \
	summary=$$(grep -E ' in [0-9.]+s' $(CVENV).log | tail -n 1); \
	printf 'torch %s (%s, %s): %s; pytest %s tests: %s\n' "$(COMPAT_TORCH)" "$(CVENV)" \
	  "$$(date -u +%F)" "$$verdict" "$$args" "$$summary" > $(CVENV).result; \
	test "$$rc" = 0

# make clients: real tensor-parallel programs (clients/NAME.py), bitwise against stock DTensor on 2
# gloo ranks, each client in a venv of its own, $(CLIENTS_DIR)/NAME, reused when present: torch from
# TORCH_SPEC (skipped when that torch is there), dtdispatch in editable mode from this checkout and
# the client's pinned packages (both redone when the checkout, its build inputs or the pins change:
# the stamp holds all three). `make clients-venvs` only builds the venvs. Fails if any case differs.
CLIENTS ?= hf titan
CLIENTS_DIR ?= .clients
CLIENT_ARGS ?=
# Per client: packages installed with their dependencies, and packages installed with --no-deps
# (torchtitan declares training infrastructure that its model code never imports).
CLIENT_PKGS_hf ?= transformers==5.25.0 accelerate==1.16.0
CLIENT_NODEPS_hf ?=
CLIENT_PKGS_titan ?= tyro==1.0.17
CLIENT_NODEPS_titan ?= torchtitan==0.3.0 spmd_types==0.2.3

clients: clients-venvs
	@failed=""; for c in $(CLIENTS); do \
	  echo "== make clients: $$c ($(CLIENTS_DIR)/$$c.log)"; start=$$(date +%s); \
	  { $(CLIENTS_DIR)/$$c/bin/torchrun --standalone --nproc-per-node 2 clients/$$c.py $(CLIENT_ARGS); \
	    echo $$? > $(CLIENTS_DIR)/$$c.rc; } 2>&1 | tee $(CLIENTS_DIR)/$$c.log; \
	  echo "== make clients: $$c ran $$(( $$(date +%s) - start )) s, exit $$(cat $(CLIENTS_DIR)/$$c.rc)"; \
	  [ "$$(cat $(CLIENTS_DIR)/$$c.rc)" = 0 ] || failed="$$failed $$c"; \
	done; \
	if [ -n "$$failed" ]; then echo "== make clients: FAILED:$$failed"; exit 1; fi; \
	echo "== make clients: every case bitwise equal to stock"

clients-venvs:
	@for c in $(CLIENTS); do $(MAKE) --no-print-directory clients-venv-one CLIENT=$$c || exit 1; done

KVENV = $(CLIENTS_DIR)/$(CLIENT)
KPKGS = $(CLIENT_PKGS_$(CLIENT))
KNODEPS = $(CLIENT_NODEPS_$(CLIENT))

clients-venv-one:
	@test -n "$(CLIENT)" || { echo "clients-venv-one needs CLIENT=NAME"; exit 2; }
	@test -x $(KVENV)/bin/python || $(PYTHON) -m venv $(KVENV)
	@$(KVENV)/bin/python -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "$(TORCH_SPEC)".split("==")[1])' \
	  2>/dev/null || $(KVENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	@key="$(CURDIR) $$(cat $(BUILD_INPUTS) | sha256sum | cut -c1-16) $(KPKGS) / $(KNODEPS)"; \
	if [ "$$(cat $(KVENV)/.dtdispatch-installed 2>/dev/null)" != "$$key" ]; then \
	  echo "== make clients: installing $(CLIENT) into $(KVENV)"; \
	  $(KVENV)/bin/python -m pip install --quiet -e . \
	  && { [ -z "$(KPKGS)" ] || $(KVENV)/bin/python -m pip install --quiet $(KPKGS); } \
	  && { [ -z "$(KNODEPS)" ] || $(KVENV)/bin/python -m pip install --quiet --no-deps $(KNODEPS); } \
	  && echo "$$key" > $(KVENV)/.dtdispatch-installed; \
	fi

lint: $(VENV)/.dtdispatch-dev
	$(VENV)/bin/ruff check dtdispatch launch tests clients setup.py
	$(VENV)/bin/mypy dtdispatch

$(VENV)/.dtdispatch-dev: $(STAMP)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS),dev]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
