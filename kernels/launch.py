"""Launching a kernel whose grid meets at the group barrier, and finding out whether it could."""
import ast
import inspect
import types

import torch
import triton

from . import config as _config
from . import precompiled as _precompiled
from .common import COUNTER_STRIDE


def barrier_counters(config, device):
    """Zeroed barrier counters of a launch, one 128-byte line per (direction, programs along batch)
    group, then the launch's status word (common.group_counter)."""
    return torch.zeros((2 * config.n_bprog + 1) * COUNTER_STRIDE.value, dtype=torch.int32, device=device)


def launch(kernel, config, counters, *args, max_polls, **constexprs):
    """kernel[grid](*args, max_polls, **constexprs, launch options of config) (max_polls: the kernel's
    last runtime argument, its bound on a barrier wait or, with TAGGED, on a poll of the step-tagged
    exchange), then raise a RuntimeError naming the kernel, config and what the programs waited for
    if a wait timed out (the grid was not co-resident) or if the launch was not cooperative where the
    grid meets at a barrier. The status read is a host sync; inside a CUDA graph capture, where none is
    allowed, it is skipped (the bounded wait still ends the launch)."""
    grid = (config.n_hblocks, config.n_bprog, 2)
    device = counters.device
    if not _config.interpreted(device):
        _precompiled.seed(device)  # once per device: the CUDA wheel's builds, before the first lookup
    compiled = kernel[grid](*args, max_polls, **constexprs, **_config.launch_options(config))
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else getattr(kernel, "__name__", str(kernel))
    capturing = not _config.interpreted(device) and torch.cuda.is_current_stream_capturing()
    if not capturing and counters[-COUNTER_STRIDE.value].item():
        waited = ("for the step-tagged exchange words of the other programs of its group"
                  if constexprs.get("TAGGED") else "at the grid barrier")
        raise RuntimeError(
            f"{name} with {config}: a program waited {waited} for more than "
            f"{max_polls} polls, so its grid of {2 * config.n_hblocks * config.n_bprog} programs was "
            "not resident at once (a launch that was not cooperative, or a GPU with fewer free SMs than the "
            "launcher assumed); its results are garbage")
    if not _config.interpreted(device):
        _config.check_cooperative(compiled, name, config)
    return compiled


def compute_cache_keys(kernel):
    """Compute the Triton cache key (JITFunction.cache_key) of ``kernel`` and of every @triton.jit
    function it calls, callees first, so that each key is a function of the sources alone (the
    modules call this at import, before anything else computes a key).

    A caller's key takes in the constexpr globals its callees use (transitively) through their
    ``used_global_vals``, which a callee fills when its own key is computed. Triton 3.6 merges a
    callee's ``used_global_vals`` before computing the callee's key: a callee whose key was not yet
    computed adds none, so a kernel's key would depend on the keys the process computed before (a
    process that launches only the backward would miss common.COUNTER_STRIDE in its key, and the CUDA
    wheel's build). Callees first, every caller sees complete sets, as Triton 3.9 (which computes the
    callee's key first) does of itself."""
    from triton.runtime import jit
    jit_callable = getattr(jit, "JITCallable", jit.JITFunction)  # older Triton has no JITCallable base
    if not isinstance(kernel, jit_callable):  # the interpreter's InterpretedFunction has no cache key
        return
    seen = set()

    def visit(fn):
        if id(fn) in seen:
            return
        seen.add(id(fn))
        for callee in _jit_callees(fn, jit_callable):
            visit(callee)
        fn.cache_key  # noqa: B018 (the property computes and keeps the key)

    visit(kernel)


def _jit_callees(fn, jit_callable):
    """The @triton.jit functions ``fn``'s source names, as Triton's DependenciesFinder resolves them:
    a name in its globals or closure, or an attribute of a module that is not Triton's."""
    scope = {**fn.__globals__, **inspect.getclosurevars(fn.fn).nonlocals}
    found = []
    for node in ast.walk(fn.parse()):
        value = None
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            value = scope.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = scope.get(node.value.id)
            if isinstance(module, types.ModuleType) and not module.__name__.startswith(triton.__name__):
                value = getattr(module, node.attr, None)
        if isinstance(value, jit_callable) and value is not fn:
            found.append(value)
    return found
