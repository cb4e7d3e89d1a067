"""Builds the CUDA kernels' cubins: nvcc once per architecture -> <out>/<unit>.sm_<arch>.cubin, with
ptxas's resource report beside each (<unit>.sm_<arch>.ptxas.txt). No GPU needed.

    python csrc/cuda/build.py [--out-dir DIR] [--archs "90a;100a"]

Architectures: --archs, else BIRNN_FAST_CUDA_ARCHS, else DEFAULT_ARCHS (those this nvcc takes).
The cluster kernels need thread-block clusters (sm_90 and later); sm_80 builds only the l2
exchange's units (L2_UNITS), which need none. A cubin newer than its sources is kept. setup.py / a
wheel build calls build(out_dir, archs).
"""
import argparse
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
# (cubin name, source, defines): the forward and the backward once per cell family, the fp32 ones
# apart (the 16-bit cubins do not depend on them), run in parallel.
UNITS = tuple((f"{kind}_{family}", f"{kind}.cu", (f"-DBIRNN_FAMILY={index}",)) for kind in ("forward", "backward")
              for index, family in enumerate(("lstm", "gru", "elman"))) + \
    tuple((f"{kind}_{family}_fp32", f"{kind}.cu", (f"-DBIRNN_FAMILY={index}", "-DBIRNN_FP32"))
          for kind in ("forward", "backward") for index, family in enumerate(("lstm", "gru", "elman"))) + \
    (("probes", "probes.cu", ()),)
# The l2 exchange's forward (plain CTAs, h through L2): once per cell family, 16-bit and fp32 apart,
# in cubins of their own (the cluster cubins do not depend on them).
L2_UNITS = tuple((f"forward_{family}_l2{suffix}", "forward.cu", (f"-DBIRNN_FAMILY={index}", "-DBIRNN_L2", *defines))
                 for suffix, defines in (("", ()), ("_fp32", ("-DBIRNN_FP32",)))
                 for index, family in enumerate(("lstm", "gru", "elman")))
DEFAULT_ARCHS = ("90a", "100a", "80")
CLUSTER_ARCHS = ("90a", "100a", "103a", "110a", "120a", "121a")
L2_ONLY_ARCHS = ("80",)  # no clusters: the l2 units only
DEFAULT_OUT = HERE.parent.parent / "birnn_fast" / "cubins"
FLAGS = ("-std=c++17", "-O3", "-cubin", "-Xptxas", "-v", "--expt-relaxed-constexpr")


def nvcc():
    """The nvcc to run: $CUDA_HOME/bin/nvcc, else the one on PATH; None if there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
        return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def supported_archs(compiler):
    listed = subprocess.run([compiler, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    return {name.removeprefix("compute_") for name in listed}


def requested_archs(archs=None):
    text = archs if archs is not None else os.environ.get("BIRNN_FAST_CUDA_ARCHS")
    if not text:
        return None
    # Compute capabilities as the wheel build names them ("9.0") stand for the cluster arch ("90a").
    names = (arch.strip().removeprefix("sm_").replace(".", "") for arch in text.replace(",", ";").split(";"))
    return tuple(name + "a" if name + "a" in CLUSTER_ARCHS else name for name in names if name)


def archs_to_build(compiler, archs=None):
    requested = requested_archs(archs)
    known = supported_archs(compiler)
    if requested is None:
        return tuple(arch for arch in DEFAULT_ARCHS if arch.rstrip("a") in known)
    for arch in requested:
        if arch not in CLUSTER_ARCHS + L2_ONLY_ARCHS:
            raise SystemExit(f"BIRNN_FAST_CUDA_ARCHS: sm_{arch} is not built: the kernels need sm_80 or thread-block "
                             f"clusters and the 'a' features (one of {', '.join(L2_ONLY_ARCHS + CLUSTER_ARCHS)})")
        if arch.rstrip("a") not in known:
            raise SystemExit(f"BIRNN_FAST_CUDA_ARCHS: this nvcc does not know sm_{arch} (it knows {sorted(known)})")
    return requested


def units(arch):
    """The compilation units built for an architecture: every one where clusters exist, else the l2 ones."""
    return L2_UNITS if arch in L2_ONLY_ARCHS else UNITS + L2_UNITS


def sources():
    return sorted(HERE.glob("*.cu")) + sorted(HERE.glob("*.cuh"))


def build_one(compiler, unit, arch, out_dir):
    """nvcc for one compilation unit and architecture; returns the cubin's path."""
    name, source, defines = unit
    cubin = out_dir / f"{name}.sm_{arch}.cubin"
    report = out_dir / f"{name}.sm_{arch}.ptxas.txt"
    newest = max(path.stat().st_mtime for path in sources())
    if cubin.exists() and report.exists() and cubin.stat().st_mtime >= newest:
        return cubin
    command = [compiler, *FLAGS, *defines, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", str(cubin) + ".tmp",
               str(HERE / source)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    report.write_text(result.stdout + result.stderr)
    os.replace(str(cubin) + ".tmp", cubin)
    return cubin


def build(out_dir=DEFAULT_OUT, archs=None, jobs=None):
    """Every unit for every architecture into out_dir; the cubins' paths. archs: "90a;100a" (default
    BIRNN_FAST_CUDA_ARCHS, else DEFAULT_ARCHS); jobs: parallel nvcc runs (default MAX_JOBS, else 2)."""
    compiler = nvcc()
    if compiler is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    work = [(unit, arch) for arch in archs_to_build(compiler, archs) for unit in units(arch)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda item: build_one(compiler, *item, out_dir), work))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT))
    parser.add_argument("--archs", default=None,
                        help='e.g. "90a;100a;80" (default: BIRNN_FAST_CUDA_ARCHS, else those nvcc knows)')
    args = parser.parse_args()
    for path in build(args.out_dir, args.archs):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
