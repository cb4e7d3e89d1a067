"""The first call with and without the CUDA wheel's precompiled Triton kernels, on a GPU: a fresh
process (an empty Triton cache) imports birnn_fast and runs one forward and backward of a layer;
the time from the process's start to the first result, and how many kernels it compiled.

    python -P benchmarks/gpu/first_call.py [--wheel birnn_fast-...whl] [--out FILE.md] [--self-test]

--wheel: a CUDA wheel built for this stack (make wheel-cuda with this Python, torch minor and
Triton), carried to the GPU host: installed with pip, offline, into a site directory of its own
(``pip install --no-index --no-deps --target``: the host's torch and Triton stay as they are, and
the wheel's pins are checked against them), then checked as a user would (imported from there, _C
loaded, engine_info), and run once as installed and once with its builds removed. Without --wheel,
the builds the timed layers need are compiled here first, as make wheel-cuda compiles them (a
stand-in target of this GPU's architecture, kernels/aot.py), into a package laid out as the
wheel's: the same mechanism end to end, on hardware. Rows: "compiled" (no builds: what the default
wheel does), "precompiled" (the wheel's builds seeded into the empty cache at the first launch),
"warm cache" (a second process on that cache: every later run).

--self-test (no GPU): with --wheel, the install and the checks above, then the replay of the
wheel's builds (the first --replay-limit of each architecture; 0: all) under stand-in targets with
an empty Triton cache, which fails if any of them compiles; without --wheel, builds for a stand-in
sm_90 and lays the sites out. Nothing is timed.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The timed layers: (cell, dtype, input size, hidden size, batch, steps); fp32 runs with TF32, as torch's default.
LAYERS = (("LSTM", "float32", 256, 256, 64, 128), ("LSTM", "bfloat16", 256, 256, 64, 128),
          ("GRU", "float32", 256, 512, 16, 128))

CHILD = r"""
import time
start = time.perf_counter()
import json, sys, warnings
warnings.simplefilter("always")
import torch
from triton import knobs
import birnn_fast
compiles = []
knobs.compilation.listener = lambda **kw: compiles.append(kw["cache_hit"])
imported = time.perf_counter()
rows = []
with warnings.catch_warnings(record=True) as caught:
    for cell, dtype, I, H, B, T in LAYERS:
        torch.manual_seed(0)
        layer = {"LSTM": birnn_fast.FastBiLSTM, "GRU": birnn_fast.FastBiGRU}[cell](I, H).cuda().to(getattr(torch, dtype))
        x = torch.randn(T, B, I, device="cuda", dtype=getattr(torch, dtype), requires_grad=True)
        before, began = len(compiles), time.perf_counter()
        output, _ = layer(x)
        output.float().sum().backward()
        torch.cuda.synchronize()
        rows.append(dict(layer=f"{cell} {dtype} I={I} H={H} B={B} T={T}", seconds=time.perf_counter() - began,
                         compiled=compiles[before:].count(False), found=compiles[before:].count(True)))
print("RESULT " + json.dumps(dict(package=birnn_fast.__file__, import_s=imported - start, rows=rows,
                                  total_s=time.perf_counter() - start,
                                  warnings=sorted({str(w.message) for w in caught if "birnn_fast" in str(w.message)}))))
"""


def layers_literal():
    return "LAYERS = " + repr(LAYERS) + "\n"


def install_wheel(wheel, site):
    """pip install the wheel into ``site`` (no index: the GPU host has no network; no dependencies: the
    host's torch and Triton are the ones to use), then fail unless its pins hold there (pip check's
    lines about birnn_fast only: the host may have other packages' unmet requirements)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site, wheel],
                   check=True)
    env = dict(os.environ, PYTHONPATH=site)
    check = subprocess.run([sys.executable, "-m", "pip", "check"], env=env, capture_output=True, text=True)
    unmet = [line for line in check.stdout.splitlines() if line.lower().startswith(("birnn_fast ", "birnn-fast "))]
    if unmet:
        raise SystemExit(f"{os.path.basename(wheel)} does not fit this stack: " + "; ".join(unmet))


CHECK_INSTALLED = r"""
import json, os, sys
import torch, triton
import birnn_fast
from birnn_fast import backends
site = os.path.realpath(sys.argv[1])
package = os.path.realpath(os.path.dirname(birnn_fast.__file__))
assert package == os.path.join(site, "birnn_fast"), (package, site)
why = backends.why_not("cpu", torch.device("cpu"), torch.float32)
assert why is None, f"_C does not load: {why}"
from birnn_fast.kernels import precompiled
manifest_path = os.path.join(precompiled.package_dir(), "manifest.json")
manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {"archs": {}}
# Whether Triton here would find the builds (its version, its files' hash, ptxas, environment).
usable = {f"sm_{arch}": precompiled.mismatch(int(arch), entry) or "usable" for arch, entry in manifest["archs"].items()}
print("CHECKED " + json.dumps(dict(builds=usable,
    package=package, torch=torch.__version__, triton=triton.__version__, cxx11_abi=torch.compiled_with_cxx11_abi(),
    cpu_engine=torch.ops.birnn_fast_cpu.engine_info(),
    engine=str(birnn_fast.engine_info("LSTM", 16, 256, device="cpu")))))
"""


def check_installed(site, work):
    """A fresh process on the installed site (-P, run from elsewhere): birnn_fast comes from there,
    its C++ library loads against this torch, engine_info answers."""
    env = dict(os.environ, PYTHONPATH=site)
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRITON_DEFAULT_FP_FUSION", None)  # as child_env: a user's environment, not make gpu-check's
    result = subprocess.run([sys.executable, "-P", "-c", CHECK_INSTALLED, site], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("CHECKED ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"the installed wheel fails its check (rc {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("CHECKED "):])


def replay_installed(site, work, limit):
    """kernels/aot.py's replay of the installed wheel's builds (stand-in targets, an empty Triton
    cache): the number that compiled instead of being found."""
    env = dict(os.environ, PYTHONPATH=site, TRITON_CACHE_DIR=os.path.join(work, "replay-cache"))
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-P", "-m", "birnn_fast.kernels.aot", "--replay",
               os.path.join(site, "birnn_fast", "_precompiled")] + (["--limit", str(limit)] if limit else [])
    return subprocess.run(command, cwd=work, env=env, timeout=3600).returncode


def source_site(site):
    """birnn_fast as the wheel lays it out, from this checkout (benchmarks/gpu/check.sh's layout)."""
    os.makedirs(os.path.join(site, "birnn_fast"))
    for name in os.listdir(os.path.join(ROOT, "birnn_fast")):
        if name.endswith(".py") or name.endswith(".so"):
            os.symlink(os.path.join(ROOT, "birnn_fast", name), os.path.join(site, "birnn_fast", name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(site, "birnn_fast", "kernels"))


def build_here(site, arch, num_sms, shared, work):
    """Compile the builds LAYERS pick on this GPU (kernels/aot.py, stand-in target ``arch``) and pack
    them into site/birnn_fast/_precompiled, run in a child with the site on its path."""
    code = layers_literal() + f"""
import torch
from birnn_fast.kernels import aot, config
builds = []
for cell, dtype, I, H, B, T in LAYERS:
    for backward in (False, True):
        for precision in (("tf32",) if dtype == "float32" else ("ieee",)):
            c = config.select_config(cell, B, H, getattr(torch, dtype), precision, {num_sms}, {shared}, backward)
            c = c._replace(n_hblocks=min(c.n_hblocks, 2), n_bprog=1)
            builds.append(dict(arch={arch}, cell=cell, dtype=dtype, precision=precision, backward=backward,
                               save=True, config=c._asdict(), hidden=H))
done = aot.build_all(builds, {os.path.join(work, 'aot-cache')!r}, 4, {os.path.join(work, 'aot.jsonl')!r})
aot.pack(builds, done, {os.path.join(site, 'birnn_fast', '_precompiled')!r})
print(len(builds), "builds packed")
"""
    env = dict(os.environ, PYTHONPATH=site)
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-P", "-c", code], env=env, check=True, cwd=work)


def child_env(site, cache, manifest):
    """A user's environment: the site first, an own Triton cache, Triton's cache-invalidating variables
    as at the build (make gpu-check sets TRITON_DEFAULT_FP_FUSION; a user has it unset)."""
    env = dict(os.environ, PYTHONPATH=site, TRITON_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRITON_DEFAULT_FP_FUSION", None)
    if manifest:
        env.update(next(iter(manifest["archs"].values()))["env"])
    return env


def run_child(site, cache, manifest, work):
    result = subprocess.run([sys.executable, "-P", "-c", layers_literal() + CHILD], cwd=work,
                            env=child_env(site, cache, manifest), capture_output=True, text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the first-call process failed (rc {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="a CUDA wheel built for this stack")
    parser.add_argument("--out", help="markdown report (default: benchmarks/results/first_call_<date>_<gpu>.md)")
    parser.add_argument("--self-test", action="store_true",
                        help="no GPU: with --wheel, install, check and replay it; without, build and lay out only")
    parser.add_argument("--replay-limit", type=int, default=0,
                        help="--self-test --wheel: replay the first N builds of each architecture (default 0: all)")
    args = parser.parse_args(argv)
    import torch
    import triton
    work = tempfile.mkdtemp(prefix="birnn_first_call.")
    try:
        with_site, without_site = os.path.join(work, "with"), os.path.join(work, "without")
        installed = None
        if args.self_test:
            arch, num_sms, shared, gpu = 90, 132, 232448, "stand-in sm_90"
        else:
            properties = torch.cuda.get_device_properties(0)
            major, minor = torch.cuda.get_device_capability(0)
            arch, num_sms = 10 * major + minor, properties.multi_processor_count
            shared = getattr(properties, "shared_memory_per_block_optin", 48 * 1024)
            gpu = torch.cuda.get_device_name(0)
        if args.wheel:
            install_wheel(args.wheel, with_site)
            installed = check_installed(with_site, work)
            print("installed: " + json.dumps(installed))
            origin = f"the wheel {os.path.basename(args.wheel)}"
            if args.self_test:
                misses = replay_installed(with_site, work, args.replay_limit)
                print(f"self-test: {os.path.basename(args.wheel)} installed, checked and replayed"
                      + ("" if misses == 0 else " with FAILURES"))
                return 1 if misses else 0
        else:
            source_site(with_site)
            build_here(with_site, arch, num_sms, shared, work)
            origin = f"builds compiled here for sm_{arch} (kernels/aot.py, stand-in target), packed as the wheel's"
        shutil.copytree(with_site, without_site, symlinks=True)
        shutil.rmtree(os.path.join(without_site, "birnn_fast", "_precompiled"), ignore_errors=True)
        manifest_path = os.path.join(with_site, "birnn_fast", "_precompiled", "manifest.json")
        if not os.path.exists(manifest_path):
            raise SystemExit(f"{origin} holds no precompiled kernels (birnn_fast/_precompiled/manifest.json)")
        with open(manifest_path) as f:
            manifest = json.load(f)
        if args.self_test:
            print(f"self-test: {sum(len(e['builds']) for e in manifest['archs'].values())} builds for "
                  f"{sorted(manifest['archs'])}; sites laid out in {work}")
            return 0
        runs = [("compiled (no builds: the default wheel)", run_child(without_site, os.path.join(work, "c1"), manifest, work)),
                ("precompiled (seeded at the first launch)", run_child(with_site, os.path.join(work, "c2"), manifest, work)),
                ("warm cache (a second process)", run_child(with_site, os.path.join(work, "c2"), manifest, work))]
        lines = [f"# First call with and without precompiled Triton kernels: {gpu}", "",
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; Python {sys.version.split()[0]}, "
                 f"torch {torch.__version__}, Triton {triton.__version__}; precompiled: {origin}. Each row a fresh "
                 "process with its own Triton cache (empty, but for the warm row); time from the process's start "
                 "(before import torch) to each layer's first forward + backward, synchronized. "
                 "`python -P benchmarks/gpu/first_call.py" + (f" --wheel {os.path.basename(args.wheel)}`" if args.wheel else "`")
                 + (f"; the installed wheel: {json.dumps(installed)}" if installed else ""),
                 "", "| run | import s | layer | first fwd+bwd s | kernels compiled | found in cache | process total s |",
                 "|---|---|---|---|---|---|---|"]
        for name, run in runs:
            for row in run["rows"]:
                lines.append(f"| {name} | {run['import_s']:.2f} | {row['layer']} | {row['seconds']:.2f} | "
                             f"{row['compiled']} | {row['found']} | {run['total_s']:.2f} |")
        for name, run in runs:
            for warning in run["warnings"]:
                lines.append(f"\n{name}: warning: {warning}")
        report = "\n".join(lines) + "\n"
        print(report)
        out = args.out or os.path.join(ROOT, "benchmarks", "results", f"first_call_{datetime.date.today()}_"
                                       f"{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}.md")
        with open(out, "w") as f:
            f.write(report)
        failed = runs[1][1]["rows"] and any(row["compiled"] for row in runs[1][1]["rows"])
        if failed:
            print("FAILED: the precompiled run compiled kernels (see the warnings above)")
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
