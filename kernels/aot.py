"""Building the Triton kernels ahead of time, for the CUDA wheel (``make wheel-cuda``), on a machine
with no GPU: every configuration ``config.select_config`` can pick on the architectures named, each
compiled through the launcher itself (forward.forward / backward.backward with that configuration,
CPU tensors of the launch's dtypes), whose kernel launch is replaced by ``JITFunction.warmup`` with
the very arguments ``launch.launch`` passes, under a stand-in driver whose target is the
architecture. Only that path gives the cache keys a launch on the GPU looks up (a kernel compiled
by hand through ``ASTSource`` gets another key).

The entries land in a Triton cache directory; ``pack`` keeps each one's metadata and cubin, one
archive per architecture, and a manifest (Triton version and key, ptxas, the cache-invalidating
environment, each configuration's cache hash), which ``precompiled.py`` reads on the user's machine.

    python -m birnn_fast.kernels.aot --archs 80,90 --out build/aot [--subset ci] [--jobs N]

builds into build/aot/cache (resumable: a configuration already there is a cache hit, ~0.02 s)
and packs into build/aot/package. ``--replay DIR`` instead launches every configuration of the
manifest in DIR through the same path and fails if any of them compiles (tests/test_wheel.py);
``--replay DIR --fresh N`` launches a sample of them each alone in a fresh process.
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import tarfile
import time

import torch
import triton

from . import backward as _backward
from . import config as _config
from . import forward as _forward

# The GPUs of each architecture the enumeration covers, as (SMs, opt-in shared memory per block):
# select_config sizes the grid by the SMs the launcher sees, so the full parts and their MIG slices
# each may pick other tiles. sm_80: A100 (108; MIG 7g 98, 4g 56, 3g 42, 2g 28, 1g 14), A30 (56).
# sm_90: H100 SXM / H200 / H800 (132), H100 PCIe (114), H20 (78), MIG 3g 60, 2g 32, 1g 16.
# sm_100: B200 (148), and its MIG slices are not covered. A GPU of another SM count is warned about
# at first use (its configurations may compile there).
DEVICES = {
    80: ((108, 166912), (98, 166912), (56, 166912), (42, 166912), (28, 166912), (14, 166912)),
    90: ((132, 232448), (114, 232448), (78, 232448), (60, 232448), (32, 232448), (16, 232448)),
    100: ((148, 232448),),
}
# (dtype, dot precision) of a launch: fp32 with and without TF32 (torch.backends' flags), fp16, bf16.
PRECISIONS = (("float32", "ieee"), ("float32", "tf32"), ("float16", "ieee"), ("bfloat16", "ieee"))
# The small marked subset CI builds and replays (about a minute on 2 cores): one cell and dtype on
# sm_80 and sm_90, forward with and without the workspace and backward, each class of hidden size
# with W_hh resident and, at 300 units (fp32 without TF32 streams past 256), each streamed tile.
CI_SUBSET = {"archs": (80, 90), "cells": ("LSTM",), "precisions": (("float32", "ieee"),),
             "hiddens": (1, 16, 17, 300)}


def hidden_class(H):
    """How Triton specializes the integer H (the kernels' only specialized size): 1, a multiple of 16,
    or neither; one build serves every H of a class."""
    return "1" if H == 1 else "16" if H % 16 == 0 else "any"


def _stream_tiles(num_sms, H, cache={}):
    """The streamed tiles select_config picks for H units on num_sms SMs, over every batch size. The
    pick depends on H only through ceil(H / 16) and ceil(H / 32), on B only through ceil(B / 16) and
    ceil(B / 32), which B = 16 m + 1 run through; past 4 * num_sms batch blocks every tile's grid is
    full and the picks repeat (tests/test_wheel.py checks this against every batch size)."""
    key = num_sms, triton.cdiv(H, 16), triton.cdiv(H, 32)
    if key not in cache:
        tiles = set()
        for B in range(1, 64 * num_sms + 2, 16):
            try:
                config = _config.select_config("RNN_TANH", B, H, torch.float32, "ieee", num_sms, 0)
            except ValueError:
                break
            tiles.add((config.BB, config.BH))
        cache[key] = sorted(tiles)
    return cache[key]


def configurations(arch, cells=None, precisions=PRECISIONS, hiddens=None):
    """Every distinct build select_config can pick on ``arch``'s GPUs (DEVICES): dicts with the cell,
    dtype, precision, pass (forward with or without the workspace, backward), the Config (one program
    along batch: the grid does not enter the build) and a hidden size of its class. hiddens: only
    these hidden sizes (default: every one up to the largest any GPU of the architecture takes)."""
    cells = cells or tuple(_config.CELLS)
    builds = {}
    for cell in cells:
        for dtype_name, precision in precisions:
            dtype = getattr(torch, dtype_name)
            for backward in (False, True):
                for num_sms, shared in DEVICES[arch]:
                    for H in hiddens or itertools.count(1):
                        configs = []
                        if (_config.resident_fits(cell, H, dtype, precision, shared, backward)
                                and 2 * triton.cdiv(H, _config.RESIDENT_TILE[1]) <= num_sms):
                            configs.append(_config.select_config(cell, 1, H, dtype, precision, num_sms, shared,
                                                                 backward))
                        else:
                            tiles = _stream_tiles(num_sms, H)
                            if not tiles:
                                break
                            configs += [_config.select_config(cell, 1, H, dtype, precision, num_sms, 0, backward,
                                                              stream_tiles=(tile,)) for tile in tiles]
                        for config in configs:
                            config = config._replace(n_hblocks=min(config.n_hblocks, 2), n_bprog=1)
                            for save in ((True,) if backward else (True, False)):
                                key = (cell, dtype_name, precision, backward, save, tuple(config), hidden_class(H))
                                builds.setdefault(key, dict(arch=arch, cell=cell, dtype=dtype_name,
                                                            precision=precision, backward=backward, save=save,
                                                            config=config._asdict(), hidden=H))
    return list(builds.values())


class StandInDriver:
    """Triton's driver as the JIT sees it, for a GPU of compute capability ``arch`` that is not there:
    the target names the architecture, the device is the architecture itself (so that each keeps its
    own in-memory kernels), the stream 0. Enough for compiles; nothing launches."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Warmup:
    """Stands for a @triton.jit kernel in a launcher's globals: ``kernel[grid](*args, **kwargs)``, as
    launch.launch calls it, compiles (or finds) the build with those arguments and launches nothing."""

    def __init__(self, kernel):
        self.kernel, self.fn, self.compiled = kernel, kernel.fn, []

    def __getitem__(self, grid):
        def warmup(*args, **kwargs):
            self.compiled.append(self.kernel.warmup(*args, grid=grid, **kwargs))
            return self.compiled[-1]
        return warmup


@contextlib.contextmanager
def stand_in(arch, precision):
    """Within: Triton targets ``arch`` and the launchers compile instead of launching, with dot
    precision ``precision`` for fp32 (the launchers read it from torch's flags on a GPU)."""
    from triton.runtime.driver import driver
    forward_kernel = _Warmup(_forward.birnn_forward_kernel)
    backward_kernel = _Warmup(_backward.birnn_backward_kernel)
    saved = _forward.birnn_forward_kernel, _backward.birnn_backward_kernel, _config.dot_precision
    _forward.birnn_forward_kernel, _backward.birnn_backward_kernel = forward_kernel, backward_kernel
    _config.dot_precision = lambda dtype, device: precision if dtype == torch.float32 else "ieee"
    # The active driver as it was (None until first asked for): reset_active() would create the
    # default one, which raises on a machine with no GPU.
    active = driver._active
    driver.set_active(StandInDriver(arch))
    try:
        yield forward_kernel, backward_kernel
    finally:
        driver.set_active(active)
        _forward.birnn_forward_kernel, _backward.birnn_backward_kernel, _config.dot_precision = saved


def warm(build):
    """Run one build (a ``configurations`` entry) through its launcher under the stand-in: returns
    the compiled kernel (Triton's CompiledKernel; .hash is its cache directory)."""
    cell, H, dtype = build["cell"], build["hidden"], getattr(torch, build["dtype"])
    config = _config.Config(**build["config"])
    # T, B and the poll limit enter no build (the kernels' do_not_specialize); a test varies them.
    (T, B), I = build.get("sizes", (2, 3)), 8
    max_polls = build.get("max_polls", _config.MAX_POLLS["cuda"])
    G = _config.GATES[cell]
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(dtype)

    weight_ih, weight_hh, bias = randn(2, G * H, I), randn(2, G * H, H), randn(2, G * H)
    h0 = randn(2, B, H)
    c0 = randn(2, B, H) if cell == "LSTM" else torch.zeros(0, dtype=dtype)
    input, lengths = randn(T, B, I), torch.full((B,), T, dtype=torch.int64)
    with stand_in(build["arch"], build["precision"]) as (forward_kernel, backward_kernel):
        if build["backward"]:
            output = randn(T, B, 2 * H)
            workspace = randn(T, B, 2, _config.WORKSPACE[cell] * H, dtype=_forward.workspace_dtype(dtype))
            _backward.backward(cell, randn(T, B, 2 * H), randn(2, B, H), c0.clone(), input, weight_ih, weight_hh,
                               bias, h0, c0, lengths, output, workspace, config=config, max_polls=max_polls)
            return backward_kernel.compiled[-1]
        _forward.forward(cell, input, weight_ih, weight_hh, bias, bias, h0, c0, lengths, build["save"],
                         config=config, max_polls=max_polls)
        return forward_kernel.compiled[-1]


def build_name(build):
    """A build's name in the manifest and the build log: readable, unique per build."""
    c = build["config"]
    return (f"sm{build['arch']}-{build['cell']}-{build['dtype']}-{build['precision']}-"
            f"{'backward' if build['backward'] else 'forward' + ('' if build['save'] else '-nosave')}-"
            f"BB{c['BB']}-BH{c['BH']}-NK{c['NK']}-BK{c['BK']}-R{int(c['RESIDENT'])}-"
            f"S{int(c['n_hblocks'] > 1)}-F{int(c['FUSED'])}-H{hidden_class(build['hidden'])}")


def kernel_key(build):
    """The cache key of the build's kernel (a hash of its source and its callees'): the build log keeps
    it, so that a build logged from other sources is built again, not resumed."""
    return (_backward.birnn_backward_kernel if build["backward"] else _forward.birnn_forward_kernel).cache_key


def _work(build):
    start = time.perf_counter()
    try:
        compiled = warm(build)
    except Exception as error:  # reported with the others at the end; the rest still build
        return build_name(build), None, f"{type(error).__name__}: {error}", None, time.perf_counter() - start
    return build_name(build), compiled.hash, compiled.name, kernel_key(build), time.perf_counter() - start


def environment(arch):
    """What besides the kernel's source enters its cache key on this machine, for ``arch``: Triton's
    version and key (a hash of its own files), the backend's (ptxas version, architecture) and the
    environment variables Triton reads into keys."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key
    return dict(triton=triton.__version__, triton_key=hashlib.sha256(triton_key().encode()).hexdigest(),
                backend=make_backend(GPUTarget("cuda", arch, 32)).hash(),
                env=dict(sorted(get_cache_invalidating_env_vars().items())))


def build_all(builds, cache_dir, jobs, log):
    """Compile ``builds`` into ``cache_dir`` with ``jobs`` processes; each finished build is one line
    of ``log`` (name, cache hash, kernel name, the kernel's key, seconds), which a rerun skips where
    the kernel's key is still the same: the build resumes."""
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(cache_dir)
    by_name = {build_name(build): build for build in builds}
    done = {}
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                entry = json.loads(line)
                build = by_name.get(entry["name"])
                if (build is not None and entry.get("source") == kernel_key(build)
                        and _cached_files(entry) is not None):
                    done[entry["name"]] = entry
    todo = [build for build in builds if build_name(build) not in done]
    print(f"{len(builds)} builds, {len(builds) - len(todo)} already built, {len(todo)} to build on {jobs} processes",
          flush=True)
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    failed = {}
    with open(log, "a") as f, context.Pool(jobs) as pool:
        for count, (name, hash_, kernel, source, seconds) in enumerate(pool.imap_unordered(_work, todo), 1):
            if hash_ is None:
                failed[name] = kernel
                print(f"  FAILED {name}: {kernel}", flush=True)
                continue
            done[name] = dict(name=name, hash=hash_, kernel=kernel, source=source, seconds=round(seconds, 3))
            f.write(json.dumps(done[name]) + "\n")
            f.flush()
            if count % 20 == 0 or count == len(todo):
                print(f"  {count}/{len(todo)} built, {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} builds failed (the others are kept: a rerun resumes): "
                           + "; ".join(f"{name}: {error}" for name, error in sorted(failed.items())))
    return done


def _cached_files(record):
    """{file name: path} of a build's metadata and cubin in Triton's cache (TRITON_CACHE_DIR), through
    its cache manager (which names directories after its own encoding of the hash); None if absent."""
    from triton.runtime.cache import get_cache_manager
    group = get_cache_manager(record["hash"]).get_group(record["kernel"] + ".json")
    if group is None:
        return None
    return {name: path for name, path in group.items() if name.endswith((".json", ".cubin"))}


def pack(builds, done, out_dir):
    """One archive per architecture (sm_XX.tar.gz: each build's metadata and cubin, under its cache
    hash) and manifest.json, into out_dir: what the CUDA wheel carries as birnn_fast/_precompiled/."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"format": 1, "archs": {}}
    for arch in sorted({build["arch"] for build in builds}):
        entries, archive = [], os.path.join(out_dir, f"sm_{arch}.tar.gz")
        with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
            for build in (build for build in builds if build["arch"] == arch):
                record = done[build_name(build)]
                for name, path in sorted(_cached_files(record).items()):
                    info = tar.gettarinfo(path, arcname=f"{record['hash']}/{name}")
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    with open(path, "rb") as data:
                        tar.addfile(info, data)
                entries.append(dict(build, name=record["name"], hash=record["hash"], kernel=record["kernel"]))
        manifest["archs"][str(arch)] = dict(environment(arch), archive=os.path.basename(archive),
                                            devices=[list(device) for device in DEVICES[arch]],
                                            builds=entries)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def replay(package_dir, seed=True, limit=None, names=None):
    """Launch every build of the manifest in package_dir through its launcher, under the stand-in for
    its architecture, after seeding Triton's cache from the package as a user's first launch does;
    returns the builds that compiled instead of being found (none, when the wheel is right).
    seed=False leaves the cache as it is (the control: from an empty cache, each build compiles);
    limit: the first builds of each architecture only; names: only the builds of these names."""
    from triton import knobs

    from . import precompiled
    compiled = []

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        if not cache_hit:
            compiled.append(metadata.get("name"))

    with open(os.path.join(package_dir, "manifest.json")) as f:
        manifest = json.load(f)
    misses = []
    knobs.compilation.listener = listener
    try:
        for arch, entry in manifest["archs"].items():
            reason = precompiled.seed_arch(int(arch), package_dir=package_dir) if seed else None
            if reason:
                raise RuntimeError(f"sm_{arch}: {reason}")
            for build in entry["builds"][:limit]:
                if names is not None and build["name"] not in names:
                    continue
                before = len(compiled)
                kernel = warm(build)
                if len(compiled) > before or kernel.hash != build["hash"]:
                    misses.append(build["name"])
    finally:
        knobs.compilation.listener = None
    return misses


def fresh_sample(manifest, per_pass=1):
    """The builds replay_fresh launches: of each architecture, the first and last ``per_pass`` forward
    builds and as many backward ones (the first and last each worker of the make built)."""
    names = []
    for entry in manifest["archs"].values():
        for backward in (False, True):
            of_pass = [build["name"] for build in entry["builds"] if build["backward"] == backward]
            names += list(dict.fromkeys(of_pass[:per_pass] + of_pass[-per_pass:]))
    return names


def replay_fresh(package_dir, per_pass=1, timeout=300):
    """Each build of fresh_sample launched alone, in a fresh process with an empty Triton cache seeded
    from the package, as a user's process that launches only that kernel: a build's cache key must be
    its configuration's alone, whatever else the process compiled or launched before (the replay
    above launches every build in one process). Returns the builds that compiled (or failed)."""
    import subprocess
    import tempfile
    with open(os.path.join(package_dir, "manifest.json")) as f:
        manifest = json.load(f)
    misses = []
    for name in fresh_sample(manifest, per_pass):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            result = subprocess.run([sys.executable, "-P", "-m", __spec__.name, "--replay", package_dir, "--only", name],
                                    env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0 or "replay: 0 builds compiled" not in result.stdout:
            misses.append(name)
            print(f"  {name}: {result.stdout.strip()} {result.stderr.strip()[-2000:]}", file=sys.stderr)
    return misses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=os.environ.get("BIRNN_FAST_CUDA_ARCHS", "8.0;9.0;10.0"),
                        help="compute capabilities, '8.0;9.0' or '80,90' (default: $BIRNN_FAST_CUDA_ARCHS)")
    parser.add_argument("--out", default=os.path.join("build", "aot"))
    parser.add_argument("--package", help="where to pack the builds (default: OUT/package)")
    parser.add_argument("--subset", choices=("all", "ci"), default="all")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    parser.add_argument("--list", action="store_true", help="print the number of builds per architecture and exit")
    parser.add_argument("--replay", metavar="DIR", help="replay the manifest in DIR; exit 1 if anything compiles")
    parser.add_argument("--no-seed", action="store_true", help="replay without seeding Triton's cache first")
    parser.add_argument("--limit", type=int, help="replay the first LIMIT builds of each architecture")
    parser.add_argument("--only", action="append", metavar="NAME", help="replay the build NAME (repeatable)")
    parser.add_argument("--fresh", type=int, metavar="N",
                        help="replay the first and last N forward and backward builds of each architecture, "
                             "each alone in a fresh process")
    args = parser.parse_args(argv)
    if args.replay and args.fresh:
        misses = replay_fresh(args.replay, args.fresh)
        print(f"replay, each build in a fresh process: {len(misses)} builds compiled instead of found"
              + "".join(f"\n  {m}" for m in misses))
        return 1 if misses else 0
    if args.replay:
        misses = replay(args.replay, seed=not args.no_seed, limit=args.limit, names=args.only)
        print(f"replay: {len(misses)} builds compiled instead of found" + "".join(f"\n  {m}" for m in misses))
        return 1 if misses else 0
    archs = parse_archs(args.archs)
    selection = dict(CI_SUBSET) if args.subset == "ci" else {}
    archs = [arch for arch in archs if arch in selection.get("archs", archs)]
    builds = [build for arch in archs
              for build in configurations(arch, selection.get("cells"), selection.get("precisions", PRECISIONS),
                                          selection.get("hiddens"))]
    if args.list:
        for arch in archs:
            print(f"sm_{arch}: {sum(build['arch'] == arch for build in builds)} builds")
        return 0
    cache_dir = os.path.join(args.out, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    done = build_all(builds, cache_dir, max(1, args.jobs), os.path.join(args.out, "builds.jsonl"))
    package = args.package or os.path.join(args.out, "package")
    manifest = pack(builds, done, package)
    for arch, entry in manifest["archs"].items():
        size = os.path.getsize(os.path.join(package, entry["archive"]))
        print(f"sm_{arch}: {len(entry['builds'])} builds, {entry['archive']} {size / 2**20:.1f} MiB")
    return 0


def parse_archs(text):
    """'8.0;9.0', '8.0 9.0' or '80,90' -> [80, 90]; sm_90a-style suffixes are Triton's own business."""
    archs = []
    for part in text.replace(",", ";").replace(" ", ";").split(";"):
        part = part.strip().lower().removeprefix("sm_").removesuffix("a").removesuffix("+ptx")
        if part:
            archs.append(int(float(part) * 10) if "." in part else int(part))
    return sorted(set(archs))


if __name__ == "__main__":
    sys.exit(main())
