# ddetr-d2: the two commands of the README are `make quickstart` and `make test`.
# Every target sets itself up first; `setup` is idempotent (stamps skip work already done).

VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip --disable-pip-version-check
CSRC      := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)
QS_OUT    ?= output/quickstart
PYTEST_ARGS ?=

.PHONY: setup setup-test quickstart test bench bench-tracking lint cuda-check clean help

help:
	@echo "make quickstart  - install, train the quickstart model on synthetic data, evaluate, run the demo"
	@echo "make test        - install (with test extras), run the test suite"
	@echo "make bench       - kernel benchmark (C++ CPU kernel vs PyTorch reference)"
	@echo "make lint        - ruff"
	@echo "make cuda-check  - compile every csrc/**/*.cu with the system nvcc (no GPU needed)"

$(PY):
	@PY310=$$(sh tools/find_python310.sh) || exit 1; \
	echo "Creating $(VENV) with $$PY310"; \
	"$$PY310" -m venv $(VENV)

$(VENV)/.deps-stamp: requirements.txt | $(PY)
	$(PIP) install --upgrade "pip>=23.3" "setuptools>=69,<76" wheel
	$(PIP) install -r requirements.txt
	@touch $@

$(VENV)/.test-deps-stamp: requirements-test.txt $(VENV)/.deps-stamp
	$(PIP) install -r requirements-test.txt -c requirements.txt
	@touch $@

# Editable install; builds ddetr_d2._C (C++ CPU kernel; CUDA too when a matching toolkit exists).
$(VENV)/.ext-stamp: $(VENV)/.deps-stamp setup.py $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	@$(PY) -c "import ddetr_d2.ops._extension as e; print('ddetr_d2._C:', 'built' if e.get_extension() else 'NOT built (%s); the pure-PyTorch op will be used' % e.extension_error())"
	@touch $@

setup: $(VENV)/.deps-stamp $(VENV)/.ext-stamp

setup-test: setup $(VENV)/.test-deps-stamp

quickstart: setup
	QS_OUT=$(QS_OUT) PY=$(PY) sh tools/quickstart.sh

test: setup-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) tools/benchmark_msda.py

bench-tracking: setup
	$(PY) tools/benchmark_tracking.py

lint: setup-test
	$(VENV)/bin/ruff check .

cuda-check: setup
	$(PY) tools/check_cuda_compile.py

clean:
	rm -rf build *.egg-info ddetr_d2/_C*.so $(VENV)/.ext-stamp
