"""Launching a kernel whose grid meets at the group barrier, and finding out whether it could."""
import torch

from . import config as _config
from . import precompiled as _precompiled
from .common import COUNTER_STRIDE


def barrier_counters(config, device):
    """Zeroed barrier counters of a launch, one 128-byte line per (direction, programs along batch)
    group, then the launch's status word (common.group_counter)."""
    return torch.zeros((2 * config.n_bprog + 1) * COUNTER_STRIDE.value, dtype=torch.int32, device=device)


def launch(kernel, config, counters, *args, max_polls, **constexprs):
    """kernel[grid](*args, max_polls, **constexprs, launch options of config) (max_polls: the kernel's
    last runtime argument, its bound on a barrier wait), then raise a RuntimeError naming
    the kernel and config if a barrier wait timed out (the grid was not co-resident) or if the launch
    was not cooperative where the grid meets at a barrier. The status read is a host sync; inside a
    CUDA graph capture, where none is allowed, it is skipped (the bounded wait still ends the launch)."""
    grid = (config.n_hblocks, config.n_bprog, 2)
    device = counters.device
    if not _config.interpreted(device):
        _precompiled.seed(device)  # once per device: the CUDA wheel's builds, before the first lookup
    compiled = kernel[grid](*args, max_polls, **constexprs, **_config.launch_options(config))
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else getattr(kernel, "__name__", str(kernel))
    capturing = not _config.interpreted(device) and torch.cuda.is_current_stream_capturing()
    if not capturing and counters[-COUNTER_STRIDE.value].item():
        raise RuntimeError(
            f"{name} with {config}: a program waited at the grid barrier for more than "
            f"{max_polls} polls, so its grid of {2 * config.n_hblocks * config.n_bprog} programs was "
            "not resident at once (a launch that was not cooperative, or a GPU with fewer free SMs than the "
            "launcher assumed); its results are garbage")
    if not _config.interpreted(device):
        _config.check_cooperative(compiled, name, config)
    return compiled
