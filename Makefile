# ddetr-d2: the two commands of the README are `make quickstart` and `make test`.
# Every target sets itself up first; `setup` is idempotent (stamps skip work already done).

VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip --disable-pip-version-check
CSRC      := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)
QS_OUT    ?= output/quickstart
PYTEST_ARGS ?=
# test processes (pytest-xdist; whole files per process so module fixtures are built once); 0: one process
TEST_WORKERS ?= 2

.PHONY: setup setup-test quickstart test bench bench-tracking bench-threads soak lint cuda-check gpu-check clean help

help:
	@echo "make quickstart  - install, train the quickstart model on synthetic data, evaluate, run the demo"
	@echo "make test        - install (with test extras), run the test suite"
	@echo "make bench       - kernel benchmark (C++ CPU kernel vs PyTorch reference)"
	@echo "make bench-tracking - query tracker vs detection + IoUTracker on synthetic MOT (tools/benchmark_tracking.py)"
	@echo "make bench-threads - training s/it on an idle / shared CPU per OpenMP wait policy"
	@echo "make soak        - kill -9 a small training run 10 times, resume, check the continuation"
	@echo "make lint        - ruff"
	@echo "make cuda-check  - compile every csrc/**/*.cu with the system nvcc (no GPU needed)"
	@echo "make gpu-check   - on a CUDA machine: build for its GPU, CUDA tests, kernel bench, AMP train, fp32/fp16/bf16 inference"

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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(PY) tools/benchmark_msda.py

bench-tracking: setup
	$(PY) tools/benchmark_tracking.py

bench-threads: setup
	$(PY) tools/benchmark_threads.py

soak: setup
	$(PY) tools/kill_resume_soak.py

lint: setup-test
	$(VENV)/bin/ruff check .

cuda-check: setup
	$(PY) tools/check_cuda_compile.py

# One call on a CUDA machine (summary in output/gpu_check/summary.{json,md}); without a GPU the CUDA steps are skipped.
gpu-check: setup-test
	$(PY) tools/gpu_check.py --output output/gpu_check

clean:
	rm -rf build *.egg-info ddetr_d2/_C*.so $(VENV)/.ext-stamp
