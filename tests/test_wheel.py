"""The wheels, as a user installs them (README "Install"). ``make test-wheel`` installs each wheel
into a fresh venv and runs the tests marked "wheel" (these, and those tests/conftest.py marks) from
/tmp with -P and BIRNN_FAST_WHEEL_TEST=1: then the installed package itself is checked (where it was
imported from, its metadata, the C++ library, user paths in fresh processes and, on a CUDA wheel,
the replay of every build it holds with an empty Triton cache, which fails if anything compiles).
In the source tree's suite those skip, and the checks of the ahead-of-time enumeration and of the
first-use warnings (not marked) run there."""
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import torch

import birnn_fast
from birnn_fast import backends
from birnn_fast.kernels import aot, precompiled
from birnn_fast.kernels import config as kernel_config

import test_user_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALLED = os.environ.get("BIRNN_FAST_WHEEL_TEST") == "1"
PRECOMPILED = os.path.exists(os.path.join(precompiled.package_dir(), "manifest.json"))


def installed_only(test):
    """Marked "wheel", and skipped in the source tree's suite."""
    skip = pytest.mark.skipif(not INSTALLED, reason="checks an installed wheel (make test-wheel)")
    return pytest.mark.wheel(skip(test))


def fresh_env(**extra):
    """The environment of a fresh user process: no interpreter, no forced backend, no test state."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("BIRNN_FAST_BACKEND", "TRITON_INTERPRET", "PYTEST_CURRENT_TEST")}
    env.update(extra)
    return env


def run_fresh(code, cwd, **env):
    """code in a fresh Python process run from cwd with -P: sys.path holds neither cwd nor the source tree."""
    return subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(code)], cwd=cwd, env=fresh_env(**env),
                          capture_output=True, text=True, timeout=600)


@installed_only
def test_the_installed_package_runs_not_the_source_tree():
    package = os.path.dirname(os.path.realpath(birnn_fast.__file__))
    site = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    assert os.path.dirname(package) in site, (package, site)
    assert os.path.dirname(os.path.realpath(aot.__file__)) == os.path.join(package, "kernels")
    # _C loads: the CPU backend is the C++ library, not the reference in its place.
    assert backends.why_not("cpu", torch.device("cpu"), torch.float32) is None


@installed_only
def test_metadata_pins_the_torch_minor_and_the_triton_of_the_builds():
    import triton
    requires = importlib.metadata.requires("birnn_fast")
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    (torch_pin,) = [req for req in requires if req.startswith("torch")]
    assert f">={major}.{minor}" in torch_pin and f"<{major}.{minor + 1}" in torch_pin, torch_pin
    triton_requires = [req for req in requires if req.startswith("triton")]
    if PRECOMPILED:
        # The builds are found only by the Triton that made them; the extra [triton] names the same.
        assert f"triton=={triton.__version__}" in triton_requires, requires
        assert all(req.startswith(f"triton=={triton.__version__}") for req in triton_requires), requires
    else:
        # CPU users need no Triton (torch's CPU wheel has none); the CUDA torch wheels bring theirs.
        assert triton_requires and all('extra == "triton"' in req for req in triton_requires), requires


USER_PATHS = ("double_backward", "proj_size", "export_with_lengths", "empty_batch")


@installed_only
@pytest.mark.parametrize("path", USER_PATHS)
def test_user_path_in_a_fresh_process_against_the_installed_package(path, tmp_path):
    if PRECOMPILED:
        pytest.skip("the CUDA wheel's package is the default wheel's, tested there")
    code = (test_user_paths.PROLOGUE + "import birnn_fast\nassert 'site-packages' in birnn_fast.__file__\n"
            + textwrap.dedent(test_user_paths.PATHS[path]) + "\nprint('user path ok')\n")
    assert "site-packages" in code
    result = run_fresh(code, tmp_path)
    assert result.returncode == 0 and "user path ok" in result.stdout, result.stderr[-4000:]


@installed_only
def test_replay_of_every_build_compiles_nothing(tmp_path):
    """The CUDA wheel's first call: every build it holds, launched through its launcher under a
    stand-in GPU of its architecture, in a fresh process with an empty Triton cache, is found."""
    if not PRECOMPILED:
        pytest.skip("the default wheel holds no precompiled kernels")
    with open(os.path.join(precompiled.package_dir(), "manifest.json")) as f:
        manifest = json.load(f)
    # CI's wheel holds sm_80 and sm_90; a stack's wheel, those it was built for (make wheel-cuda ARCHS=...).
    assert manifest["archs"] and set(manifest["archs"]) <= {"80", "90", "100"}, sorted(manifest["archs"])
    builds = sum(len(entry["builds"]) for entry in manifest["archs"].values())
    result = subprocess.run([sys.executable, "-P", "-m", "birnn_fast.kernels.aot", "--replay", precompiled.package_dir()],
                            cwd=tmp_path, env=fresh_env(TRITON_CACHE_DIR=str(tmp_path / "triton")),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "replay: 0 builds compiled" in result.stdout, result.stdout + result.stderr[-4000:]
    assert builds > 0


@installed_only
def test_replay_without_the_seed_compiles(tmp_path):
    """The replay's control: from an empty cache, without the wheel's builds, a build compiles and
    the replay says so (one build per architecture, a few seconds each)."""
    if not PRECOMPILED:
        pytest.skip("the default wheel holds no precompiled kernels")
    result = subprocess.run([sys.executable, "-P", "-m", "birnn_fast.kernels.aot", "--replay", precompiled.package_dir(),
                             "--no-seed", "--limit", "1"],
                            cwd=tmp_path, env=fresh_env(TRITON_CACHE_DIR=str(tmp_path / "triton")),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "builds compiled instead of found" in result.stdout, result.stdout + result.stderr


@installed_only
def test_builds_launched_each_alone_in_a_fresh_process_compile_nothing(tmp_path):
    """A user's process launches one kernel first, not every build in the make's order: a sample of
    the builds (the first and last forward and backward ones of each architecture), each launched
    alone in a fresh process seeded from the wheel, is found (a build's key is its configuration's
    alone, whatever the process compiled before)."""
    if not PRECOMPILED:
        pytest.skip("the default wheel holds no precompiled kernels")
    result = subprocess.run([sys.executable, "-P", "-m", "birnn_fast.kernels.aot", "--replay", precompiled.package_dir(),
                             "--fresh", "1"],
                            cwd=tmp_path, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "fresh process: 0 builds compiled" in result.stdout, \
        result.stdout + result.stderr[-4000:]


def test_sizes_other_than_h_share_one_build(tmp_path):
    """do_not_specialize on T, B and the poll limit: launches that differ only there (1, a multiple
    of 16, neither) find the first one's build; H = 16 (its class differs) compiles another."""
    code = f"""
        import json, torch
        from triton import knobs
        from birnn_fast.kernels import aot
        hits = []
        knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
        build = dict(arch=90, cell="RNN_TANH", dtype="float16", precision="ieee", backward=False, save=False,
                     hidden=17, config=aot.configurations(90, ("RNN_TANH",), (("float16", "ieee"),), (17,))[0]["config"])
        hashes = set()
        for T, B in ((1, 1), (16, 32), (5, 17)):
            hashes.add(aot.warm(dict(build, sizes=(T, B))).hash)
        hashes.add(aot.warm(dict(build, sizes=(2, 3), max_polls=1 << 30)).hash)
        print(json.dumps(dict(hashes=len(hashes), compiles=hits.count(False))))
        other = aot.warm(dict(build, hidden=16)).hash
        print(json.dumps(dict(other=other not in hashes, compiles=hits.count(False))))
    """
    result = run_fresh(code, tmp_path, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    assert result.returncode == 0, result.stderr[-4000:]
    same, other = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert same == {"hashes": 1, "compiles": 1}
    assert other == {"other": True, "compiles": 2}


# Triton 3.6's DependenciesFinder._update_hash, which merges a callee's used_global_vals before
# computing the callee's key (3.9 computes the key first): installed in a process, it makes Triton
# 3.9 compute keys as 3.6 does, where a kernel's key depended on the keys computed before it.
TRITON_36_UPDATE_HASH = """
    from triton.runtime import jit
    def _update_hash(self, func):
        self.used_global_vals.update(func.used_global_vals)
        self.hasher.update((func.cache_key + str(getattr(func, "noinline", False))).encode("utf-8"))
    jit.DependenciesFinder._update_hash = _update_hash
"""
KERNEL_KEYS = """
    import json
    from birnn_fast.kernels import backward, forward
    kernels = dict(forward=forward.birnn_forward_kernel, backward=backward.birnn_backward_kernel)
    for name in {order}:
        kernels[name].cache_key  # computed in this order (the other's computed after)
    print(json.dumps({{name: [kernel.cache_key, sorted(name for name, _ in kernel.used_global_vals)]
                      for name, kernel in kernels.items()}}))
"""


@pytest.mark.parametrize("order", [("backward", "forward"), ("forward", "backward")])
def test_a_kernels_cache_key_does_not_depend_on_the_keys_computed_before(order, tmp_path):
    """The cause of builds of the CUDA wheel missed by a process that launched only the backward
    (Triton 3.6): a kernel's cache key takes in the constexpr globals its callees use, which Triton
    3.6 merged only from callees whose own key the process had already computed, so the backward
    kernel's key differed with and without a forward launched first. launch.compute_cache_keys
    (at import) computes every key callees first: the keys, under 3.6's merge in either order, are
    those of this Triton's own. No compile, no GPU."""
    keys = []
    for emulate in ("", TRITON_36_UPDATE_HASH):
        result = run_fresh(emulate + KERNEL_KEYS.format(order=order), tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        keys.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert keys[1] == keys[0]
    # Each kernel's key holds the globals of its callees: common.group_counter's stride, too.
    assert all("COUNTER_STRIDE" in names for _, names in keys[0].values()), keys[0]


def test_each_jit_functions_globals_hold_its_callees(tmp_path):
    """The invariant compute_cache_keys keeps, in a fresh process (not the interpreter's, whose
    functions have no keys): every @triton.jit function reached from the kernels holds in
    used_global_vals (which its key hashes) those of each function it calls; and no two of a
    kernel's globals share a name with another value (Triton 3.6 orders them by the address of their
    module's dict, so the key would depend on it)."""
    code = """
        from triton.runtime.jit import JITCallable
        from birnn_fast.kernels import backward, forward, launch
        seen = {}

        def check(fn):
            if id(fn) in seen:
                return
            seen[id(fn)] = fn
            for callee in launch._jit_callees(fn, JITCallable):
                check(callee)
                assert fn.hash is not None and callee.used_global_vals.items() <= fn.used_global_vals.items(), \\
                    (fn.__name__, callee.__name__)

        for kernel in (forward.birnn_forward_kernel, backward.birnn_backward_kernel):
            check(kernel)
            values = {}
            for (name, _), (value, _) in kernel.used_global_vals.items():
                assert values.setdefault(name, repr(value)) == repr(value), (kernel.__name__, name)
        print(len(seen), "functions checked")
    """
    result = run_fresh(code, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-3]) > 20, result.stdout


@pytest.mark.parametrize("num_sms", [16, 108, 132])
def test_stream_tiles_are_every_pick_over_batch_sizes(num_sms):
    for H in (1, 17, 48, 300, 1000):
        picked = set()
        for B in range(1, 8 * 64 * num_sms, 3):
            try:
                config = kernel_config.select_config("RNN_TANH", B, H, torch.float32, "ieee", num_sms, 0)
            except ValueError:
                break
            picked.add((config.BB, config.BH))
        assert picked == set(aot._stream_tiles(num_sms, H)), (num_sms, H)


def test_every_pick_of_select_config_is_enumerated():
    """Whatever select_config picks for a GPU of DEVICES (any B, H, pass) is one of the builds."""
    cell, dtype_name, precision = "GRU", "float32", "tf32"
    dtype = getattr(torch, dtype_name)
    builds = aot.configurations(90, (cell,), ((dtype_name, precision),))
    names = {aot.build_name(build) for build in builds}
    generator = torch.Generator().manual_seed(0)
    for num_sms, shared in aot.DEVICES[90]:
        for _ in range(300):
            B = int(torch.randint(1, 5000, (), generator=generator))
            H = int(torch.randint(1, 1200, (), generator=generator))
            for backward in (False, True):
                try:
                    config = kernel_config.select_config(cell, B, H, dtype, precision, num_sms, shared, backward)
                except ValueError:
                    continue
                config = config._replace(n_hblocks=min(config.n_hblocks, 2), n_bprog=1)
                build = dict(arch=90, cell=cell, dtype=dtype_name, precision=precision, backward=backward, save=True,
                             config=config._asdict(), hidden=H)
                assert aot.build_name(build) in names, (num_sms, B, H, config)


def test_parse_archs():
    assert aot.parse_archs("8.0;9.0;10.0") == [80, 90, 100]
    assert aot.parse_archs("80, 90a") == [80, 90]
    assert aot.parse_archs("sm_90 9.0") == [90]


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A CUDA wheel's manifest holding sm_90 builds, as the installed package's, and a GPU faked."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "archs": {"90": {"builds": []}}}))
    monkeypatch.setattr(precompiled, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(precompiled, "_seeded", {})
    monkeypatch.setattr(precompiled, "_warned", set())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(multi_processor_count=84, shared_memory_per_block_optin=101376))

    def gpu(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    return gpu


def test_another_architecture_warns_once_and_compiles_as_today(fake_wheel):
    fake_wheel((8, 6))
    with pytest.warns(RuntimeWarning, match=r"this GPU is sm_86, the wheel holds builds for sm_90.*compile at first use"):
        precompiled.seed(torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precompiled.seed(torch.device("cuda", 0))  # once per device: no second warning, no second look
    assert precompiled._seeded[0].startswith("this GPU is sm_86")


def test_no_manifest_says_nothing(tmp_path, monkeypatch):
    """The default wheel and a source checkout hold no builds, and promise none."""
    monkeypatch.setattr(precompiled, "_PACKAGE_DIR", str(tmp_path))
    assert precompiled.seed_arch(90) is None


@installed_only
def test_another_triton_environment_warns_and_seeds_nothing(tmp_path):
    """A variable that enters Triton's cache keys, set otherwise than at build time, makes every build
    miss: the wheel says so instead of seeding."""
    if not PRECOMPILED:
        pytest.skip("the default wheel holds no precompiled kernels")
    cache = tmp_path / "triton"
    result = run_fresh("from birnn_fast.kernels import precompiled; print(precompiled.seed_arch(90))", tmp_path,
                       TRITON_CACHE_DIR=str(cache), TRITON_DEFAULT_FP_FUSION="0")
    assert result.returncode == 0 and "TRITON_DEFAULT_FP_FUSION" in result.stdout, result.stdout + result.stderr
    assert not cache.exists() or not any(cache.iterdir())
