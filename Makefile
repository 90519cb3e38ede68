# gwcore developer entry points. `make run` and `make test` bootstrap .venv and the compiled core.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gwcore-installed
EXT := gwcore/_dedup$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
PYTEST_ARGS ?=

.PHONY: run test compile debug annotate bench bench-smoke load clean distclean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Rebuild the extension whenever the Cython sources change (editable installs do not), and
# whenever the build in place is a debug build (setup.py records the mode in build/gwcore-mode).
ifeq ($(shell cat build/gwcore-mode 2>/dev/null),debug)
.PHONY: $(EXT)
endif
$(EXT): $(STAMP) gwcore/_dedup.pyx gwcore/_dedup.pxd gwcore/_parts/*.pyx gwcore/includes/debug.h
	$(PY) setup.py -q build_ext --inplace

compile: $(EXT)

run: compile
	$(VENV)/bin/gwcore serve

test: compile
	$(PY) -m pytest tests bench --benchmark-disable -q $(PYTEST_ARGS)

debug: $(STAMP)
	GWCORE_DEBUG=1 GWCORE_CYTHON_ALWAYS=1 $(PY) setup.py -q build_ext --inplace

annotate: $(STAMP)
	GWCORE_ANNOTATE=1 GWCORE_CYTHON_ALWAYS=1 $(PY) setup.py -q build_ext --inplace

bench: compile
	$(PY) -m pytest bench --benchmark-only

bench-smoke: compile
	$(PY) -m pytest bench --benchmark-disable -q

load: compile
	$(PY) bench/load/run_load.py

clean:
	rm -rf build gwcore/*.c gwcore/*.so gwcore/*.html .pytest_cache

distclean: clean
	rm -rf $(VENV) *.egg-info .benchmarks .hypothesis
