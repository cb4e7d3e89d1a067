"""The Triton kernels the CUDA wheel carries compiled (birnn_fast/_precompiled/, built by aot.py):
at the first launch on a GPU, ``seed`` puts those of the GPU's architecture into Triton's cache, so
that the launch and every later one find their builds instead of compiling them.

Each entry goes in through Triton's cache manager (wherever TRITON_CACHE_DIR or its default puts
it): a cache directory copied as it is would miss, since its group files hold absolute paths. A
marker entry (keyed on the manifest and architecture) makes the next process's check one file
lookup. Where the wheel's builds cannot be the ones Triton looks up (no manifest is the default
wheel or a source checkout: nothing to say), a warning says why, once, and the kernels compile at
first use as without the wheel's builds.
"""
import hashlib
import json
import os
import tarfile
import threading
import warnings

import torch

_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_precompiled")
_lock = threading.Lock()
_seeded = {}  # device index -> the reason its builds were not seeded, or None
_warned = set()


def package_dir():
    """Where an installed CUDA wheel keeps its builds (birnn_fast/_precompiled/); beside the kernels,
    which the wheel installs as birnn_fast/kernels/."""
    return _PACKAGE_DIR


def seed(device):
    """Seed Triton's cache with the wheel's builds for ``device``'s architecture, once per device and
    process (launch.launch calls this before a kernel's first launch on a GPU)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _seeded:
        return
    with _lock:
        if index in _seeded:
            return
        major, minor = torch.cuda.get_device_capability(index)
        properties = torch.cuda.get_device_properties(index)
        gpu = (properties.multi_processor_count, getattr(properties, "shared_memory_per_block_optin", 48 * 1024))
        try:
            reason = seed_arch(10 * major + minor, gpu=gpu)
        except Exception as error:  # a damaged wheel or an unwritable cache must not stop the layer
            reason = f"seeding Triton's cache failed ({type(error).__name__}: {error})"
        if reason:
            _warn_once(f"birnn_fast: the CUDA wheel's precompiled Triton kernels are not used: {reason}; "
                       "they compile at first use instead (seconds per configuration)")
        _seeded[index] = reason


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def mismatch(arch, entry):
    """Why the manifest entry's builds for ``arch`` cannot be what Triton looks up here (what enters
    its cache keys besides the kernels differs), or None."""
    from . import aot
    here = aot.environment(arch)
    for field, what in (("triton", "Triton version"), ("triton_key", "Triton build (its files' hash)"),
                        ("backend", "ptxas version (TRITON_PTXAS_PATH?)"), ("env", "Triton environment variables")):
        if here[field] != entry[field]:
            if field == "env":
                names = sorted(name for name in set(here["env"]) | set(entry["env"])
                               if here["env"].get(name) != entry["env"].get(name))
                return f"the {what} {', '.join(names)} differ from the build's (they enter Triton's cache keys)"
            return f"the {what} differs: built with {entry[field]!r}, here {here[field]!r}"
    return None


def seed_arch(arch, gpu=None, package_dir=None):
    """Seed Triton's cache with the builds for compute capability ``arch`` (e.g. 90) from the package
    at package_dir (default: the installed wheel's). Returns None when seeded (or there is nothing to
    seed: no manifest), else why not. gpu: (SMs, opt-in shared memory) of the device, which gets a
    warning when the wheel's enumeration did not cover it (some of its picks may then compile)."""
    package_dir = package_dir or _PACKAGE_DIR
    manifest_path = os.path.join(package_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        return None
    with open(manifest_path, "rb") as f:
        manifest_bytes = f.read()
    manifest = json.loads(manifest_bytes)
    entry = manifest["archs"].get(str(arch))
    if entry is None:
        built = ", ".join(f"sm_{a}" for a in sorted(manifest["archs"], key=int))
        return f"this GPU is sm_{arch}, the wheel holds builds for {built} (Triton loads cubins for their exact architecture)"
    reason = mismatch(arch, entry)
    if reason:
        return reason
    if gpu is not None and list(gpu) not in entry["devices"]:
        _warn_once(f"birnn_fast: the CUDA wheel's precompiled Triton kernels were enumerated for sm_{arch} GPUs "
                   f"with (SMs, shared memory) in {entry['devices']}; this one has {tuple(gpu)}, so a few of its "
                   "configurations may compile at first use")
    from triton.runtime.cache import get_cache_manager
    marker_key = hashlib.sha256(manifest_bytes + f"sm_{arch}".encode()).hexdigest()
    marker = get_cache_manager(marker_key)
    if marker.get_file("seeded") is not None:
        return None
    with tarfile.open(os.path.join(package_dir, entry["archive"]), "r:gz") as tar:
        members = {}
        for member in tar.getmembers():
            if member.isfile():
                directory, name = member.name.split("/")
                members.setdefault(directory, {})[name] = tar.extractfile(member).read()
    for directory, files in members.items():
        cache = get_cache_manager(directory)
        metadata = next(name for name in files if name.endswith(".json"))
        if cache.get_group(metadata) is not None:
            continue
        group = {name: cache.put(data if name.endswith(".cubin") else data.decode(), name)
                 for name, data in files.items()}
        cache.put_group(metadata, group)
    marker.put(json.dumps({"arch": arch, "builds": len(members)}), "seeded")
    return None
