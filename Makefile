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

# The editable install builds the extension in place, once, with .venv's own build requirements
# (pyproject.toml's [build-system]; so `setup.py build_ext --inplace` afterwards finds it current),
# quietly: setuptools' advice on editable installs is not for us. The selected-mode tests need the
# RabbitMQ client and the PostgreSQL client, extras (pip install 'gwcore[rabbitmq,postgresql]');
# tests/test_plot.py and the benchmark drivers' pictures need matplotlib, the bench extra.
BUILD_REQUIRES = $(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(BUILD_REQUIRES) | xargs -d '\n' $(PY) -m pip install -q
	PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-build-isolation -e '.[dev,rabbitmq,postgresql,bench]'
	touch $@

# Rebuild the extension whenever the Cython sources change (editable installs do not), and
# whenever the build in place is not a release build: a debug or fuzz build (setup.py records the
# mode in build/gwcore-mode).
ifneq ($(filter-out release,$(shell cat build/gwcore-mode 2>/dev/null)),)
.PHONY: $(EXT)
endif
# The install is an order-only prerequisite: installing builds the extension, which must not be
# built a second time because the install's stamp is newer (on a fresh clone the recipe still runs,
# as the file was missing when make looked, and finds it current).
$(EXT): gwcore/_dedup.pyx gwcore/_dedup.pxd gwcore/_parts/*.pyx gwcore/includes/debug.h | $(STAMP)
	$(PY) setup.py -q build_ext --inplace

compile: $(EXT)

run: compile
	$(VENV)/bin/gwcore serve

# Most of the suite on two workers, then the tests that must run alone (tests/ci.py SERIAL);
# exit status 5 (no test selected, as PYTEST_ARGS=-k can make either half) is not a failure.
test: compile
	$(PY) -m pytest tests bench --benchmark-disable -q -n 2 -m "not serial" $(PYTEST_ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ]
	$(PY) -m pytest tests -q -m serial $(PYTEST_ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ]

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
