# gwcore developer entry points. `make run` and `make test` bootstrap .venv and the compiled core.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gwcore-installed
EXT := gwcore/_dedup$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
PYTEST_ARGS ?=
# make fuzz: seconds per fuzz target
FUZZ_SECONDS ?= 60

.PHONY: run test compile debug fuzz annotate bench bench-smoke load clean distclean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Rebuild the extension whenever the Cython sources change (editable installs do not), and
# whenever the build in place is not a release build: a debug or fuzz build (setup.py records the
# mode in build/gwcore-mode).
ifneq ($(filter-out release,$(shell cat build/gwcore-mode 2>/dev/null)),)
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

# Coverage-guided fuzzing (fuzz/, docs/development.md "Fuzzing"): the fuzz build in place (clang,
# -fsanitize=fuzzer-no-link,address), then every target for FUZZ_SECONDS; a crash fails it.
# Needs clang and its compiler-rt (apt-get install clang libclang-rt-14-dev); atheris is installed
# here, not with the dev extra, since it is of no use without them. `make compile` (or `make test`)
# puts the release build back.
fuzz: $(STAMP)
	$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q 'atheris>=3.0'
	GWCORE_FUZZ=1 $(PY) setup.py -q build_ext --inplace
	PY=$(PY) fuzz/run $(FUZZ_SECONDS)

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
