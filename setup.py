"""Build birnn_fast: the Python package, the Triton kernels (as birnn_fast.kernels) and the C++ op
library birnn_fast._C.

Knobs (as flash-attention): MAX_JOBS limits ninja's parallel compiles; BIRNN_FAST_CUDA_ARCHS
(e.g. "8.0;9.0") names CUDA targets for the day csrc/cuda/ holds sources -- it is read from the
environment, never from torch.cuda.is_available(), since wheel builders have no GPU.
BIRNN_FAST_SKIP_BUILD=1 installs the pure-Python package only (the reference and Triton backends).
BIRNN_FAST_SANITIZE=1 builds the C++ library with AddressSanitizer and UndefinedBehaviorSanitizer
into build/sanitize/ (``make sanitize`` builds it there and runs the CPU tests on it), leaving the
normal build alone: `python setup.py build` puts the whole package under build/sanitize/lib*/, so
that PYTHONPATH picks it over the editable install.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SANITIZE = os.environ.get("BIRNN_FAST_SANITIZE") == "1"


def extensions():
    if os.environ.get("BIRNN_FAST_SKIP_BUILD") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if os.environ.get("BIRNN_FAST_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    if SANITIZE:
        # Every finding is fatal (no recovery), so a test that trips one fails; -O1 keeps the
        # reports' stacks readable at a tolerable speed.
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx_flags = [flag for flag in cxx_flags if flag != "-O3"] + ["-O1", "-g", *sanitizers]
        link_flags += sanitizers
    ext = CppExtension(
        "birnn_fast._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="birnn_fast",
    version="0.1.0",
    description="Fast bidirectional LSTM/GRU/RNN layers for PyTorch: fused Triton (GPU) and C++ (CPU) kernels",
    packages=["birnn_fast", "birnn_fast.kernels"],
    package_dir={"birnn_fast": "birnn_fast", "birnn_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"build": {"build_base": os.path.join("build", "sanitize")}} if SANITIZE else {},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "hypothesis"]},
)
