# `make demo` (the main job) and `make test` (the tests) work on a fresh machine from a clean
# checkout: each first makes .venv with everything it needs and builds the C++ library.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPENDENCIES := torch==2.13.0 triton==3.9.0 ninja numpy pytest pytest-benchmark hypothesis

.PHONY: demo test bench
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPENDENCIES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/train_tagger.py

test: $(VENV)/.installed
	$(PY) -m pytest tests
	$(PY) -m pytest benchmarks --benchmark-disable -q

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-json=benchmarks/results/cpu.json

# The GPU path (kernels/): `sass-report` writes benchmarks/results/sass_$(SASS).md from offline sm_90
# builds (no GPU needed).
.PHONY: sass-report
SASS ?= after
sass-report: $(VENV)/.installed
	TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.gpu.sass_report --title $(SASS) \
		--out benchmarks/results/sass_$(SASS).md

# `gpu-check`: the hardware check of the GPU path, about 8 minutes on an H100/H200 (see
# benchmarks/gpu/check.sh); `gpu-selftest`: the same script on the CPU, interpreted, tiny sizes (CI).
.PHONY: gpu-check gpu-selftest
gpu-check:
	bash benchmarks/gpu/check.sh

gpu-selftest: $(VENV)/.installed
	PY=$(abspath $(PY)) bash benchmarks/gpu/check.sh --self-test
