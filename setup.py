"""Build birnn_fast: the Python package, the Triton kernels (as birnn_fast.kernels) and the C++ op
library birnn_fast._C. The README's "Install" section is the user's side of this.

    pip wheel --no-build-isolation --no-deps .        # the default wheel (make wheel repairs its tag)
    BIRNN_FAST_CUDA_ARCHS="8.0;9.0;10.0" pip wheel --no-build-isolation --no-deps .   # the CUDA wheel

Knobs (as flash-attention's), all read from the environment:
- MAX_JOBS: parallel compiles, of ninja for the C++ library (torch's BuildExtension reads it) and of
  the processes building the Triton kernels ahead of time.
- BIRNN_FAST_CUDA_ARCHS (e.g. "8.0;9.0;10.0"): build the CUDA wheel for these compute capabilities:
  every configuration the Triton launchers can pick there, compiled ahead of time (kernels/aot.py,
  resumable in build/aot/triton-<version>/), packed as birnn_fast/_precompiled/, and the CUDA kernels' cubins for
  those with thread-block clusters ("9.0" -> sm_90a, "10.0" -> sm_100a), built by csrc/cuda/build.py
  where nvcc is here, else those a `make cubins` left in birnn_fast/cubins/. Never taken from
  torch.cuda.is_available(): wheel builders have no GPU. Unset: the default wheel, which compiles
  the Triton kernels at first use on a GPU. BIRNN_FAST_AOT_SUBSET=ci builds only the small subset CI
  replays (kernels/aot.py CI_SUBSET).
- BIRNN_FAST_LOCAL_VERSION: the wheel's local version label (the CUDA wheel's defaults to
  torch<X.Y>.triton<A.B>; PyPI takes no label, so the default wheel has none unless asked).
- BIRNN_FAST_SKIP_BUILD=1 installs the pure-Python package only (the reference and Triton backends).
- BIRNN_FAST_NATIVE=1 compiles the C++ library with -march=native (not for wheels).
- BIRNN_FAST_SANITIZE=1 builds the C++ library with AddressSanitizer and UndefinedBehaviorSanitizer
  into build/sanitize/ (``make sanitize`` builds it there and runs the CPU tests on it), leaving the
  normal build alone: `python setup.py build` puts the whole package under build/sanitize/lib*/, so
  that PYTHONPATH picks it over the editable install.

The wheel's metadata pins torch to the minor version _C is built against (its C++ ABI changes
between minors: on another one _C fails to load); triton is the extra [triton] at the minor the
kernels were checked with, except in the CUDA wheel, whose builds only an identical Triton finds:
there it is required at exactly the version that built them.
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
SANITIZE = os.environ.get("BIRNN_FAST_SANITIZE") == "1"
SKIP_BUILD = os.environ.get("BIRNN_FAST_SKIP_BUILD") == "1"
CUDA_ARCHS = os.environ.get("BIRNN_FAST_CUDA_ARCHS", "").strip()
VERSION = "0.1.0"
# The Triton minor the kernels' configurations were checked with (kernels/config.py).
TRITON_CHECKED = "3.9"


def extensions():
    if SKIP_BUILD:
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


def minor(version):
    return ".".join(version.split("+")[0].split(".")[:2])


def next_minor(version):
    major, minor_ = minor(version).split(".")
    return f"{major}.{int(minor_) + 1}"


def requirements():
    """install_requires and the version: torch pinned to the minor _C is built against; triton as
    described in the module's docstring."""
    if SKIP_BUILD:
        return ["torch>=2.4"], VERSION
    import torch
    requires = [f"torch>={minor(torch.__version__)},<{next_minor(torch.__version__)}"]
    label = os.environ.get("BIRNN_FAST_LOCAL_VERSION")
    if CUDA_ARCHS:
        import triton
        requires.append(f"triton=={triton.__version__}")
        label = label or f"torch{minor(torch.__version__)}.triton{minor(triton.__version__)}"
    return requires, VERSION + (f"+{label}" if label else "")


class BuildPy(build_py):
    """build_py, and for the CUDA wheel (BIRNN_FAST_CUDA_ARCHS) the Triton kernels built ahead of time
    into birnn_fast/_precompiled/ and the CUDA cubins into birnn_fast/cubins/ of the build."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        package = os.path.join(os.path.abspath(self.build_lib), "birnn_fast")
        precompiled = os.path.join(package, "_precompiled")
        # build/lib outlives a build: a CUDA wheel's kernels must not reach the next default wheel.
        for stale in (precompiled, os.path.join(package, "cubins")):
            shutil.rmtree(stale, ignore_errors=True)
        if not CUDA_ARCHS:
            return
        # Run from the build's own layout (birnn_fast/kernels/ in place), not the source tree's.
        env = dict(os.environ, PYTHONPATH=os.path.abspath(self.build_lib))
        env.pop("TRITON_INTERPRET", None)  # interpreted kernels compile nothing
        # One build directory per Triton version: a build resumes from its log, whose entries name
        # configurations, not the Triton that compiled them.
        import triton
        subprocess.check_call([sys.executable, "-m", "birnn_fast.kernels.aot", "--archs", CUDA_ARCHS,
                               "--subset", os.environ.get("BIRNN_FAST_AOT_SUBSET", "all"),
                               "--out", os.path.join(ROOT, "build", "aot", f"triton-{triton.__version__}"),
                               "--package", precompiled],
                              cwd=os.path.abspath(self.build_lib), env=env)
        # csrc/cuda/'s kernels for the listed capabilities build.py takes (those with thread-block
        # clusters, "9.0" -> sm_90a, all units; sm_80, the l2 units), built with nvcc where it is
        # here; else whatever cubins a `make cubins` left in birnn_fast/cubins/.
        spec = importlib.util.spec_from_file_location("birnn_fast_cuda_build", os.path.join(ROOT, "csrc", "cuda", "build.py"))
        cuda_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cuda_build)
        built = cuda_build.CLUSTER_ARCHS + cuda_build.L2_ONLY_ARCHS
        cuda_archs = [arch for arch in cuda_build.requested_archs(CUDA_ARCHS) if arch in built]
        ci_subset = os.environ.get("BIRNN_FAST_AOT_SUBSET") == "ci"  # CI's wheel replays Triton builds only
        if cuda_archs and not ci_subset and cuda_build.nvcc() is not None:
            cuda_build.build(os.path.join(package, "cubins"), ";".join(cuda_archs))
            for report in glob.glob(os.path.join(package, "cubins", "*.txt")):
                os.remove(report)
            return
        cubins = sorted(glob.glob(os.path.join(ROOT, "birnn_fast", "cubins", "*.cubin")))
        if cubins:
            os.makedirs(os.path.join(package, "cubins"), exist_ok=True)
            for cubin in cubins:
                shutil.copy2(cubin, os.path.join(package, "cubins"))


ext_modules, cmdclass = extensions()
cmdclass["build_py"] = BuildPy
install_requires, version = requirements()
# The extra [triton]: the checked minor; in the CUDA wheel, the exact Triton it already requires (the
# checked minor there would contradict the pin, and `pip install birnn_fast[triton]` could not resolve).
triton_extra = ([req for req in install_requires if req.startswith("triton")]
                or [f"triton>={TRITON_CHECKED},<{next_minor(TRITON_CHECKED)}"])

setup(
    name="birnn_fast",
    version=version,
    description="Fast bidirectional LSTM/GRU/RNN layers for PyTorch: fused Triton (GPU) and C++ (CPU) kernels",
    packages=["birnn_fast", "birnn_fast.kernels"],
    package_dir={"birnn_fast": "birnn_fast", "birnn_fast.kernels": "kernels"},
    # The GPU dispatch's measured table (birnn_fast/dispatch.py): without it every shape runs ours.
    package_data={"birnn_fast": ["dispatch_table.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"build": {"build_base": os.path.join("build", "sanitize")}} if SANITIZE else {},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={"triton": triton_extra,
                    "test": ["pytest", "pytest-benchmark", "hypothesis"]},
)
