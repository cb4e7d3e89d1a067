"""The floor of the kernels' steps, for the benchmarks: a kernel whose grid meets at the kernels' own
group barrier once per step and does nothing else."""
import triton
import triton.language as tl

from birnn_fast.kernels import config as kernel_config
from birnn_fast.kernels.common import group_barrier, group_counter
from birnn_fast.kernels.launch import barrier_counters, launch


@triton.jit
def barrier_floor_kernel(counter_ptr, steps, max_polls, SYNC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
                         NK: tl.constexpr, BK: tl.constexpr, RESIDENT: tl.constexpr):
    """The grid meets at the group barrier, steps times (the tile constexprs are the kernels', unused)."""
    p_counter, p_status = group_counter(counter_ptr)
    failed = tl.zeros([], tl.int32)
    for s in range(0, steps):
        failed = group_barrier(p_counter, p_status, (s + 1) * tl.num_programs(0), failed, max_polls, SYNC)


def barrier_floor(cell, input, H, config=None, max_polls=None):
    """barrier_floor_kernel on the grid the forward takes for input (T, B, I) with equal lengths: as
    many barriers as its steps, T. Like the forward, it allocates its counters and launches from Python,
    so timings include that overhead; a grid that cannot be resident at once raises, as the kernels'.
    Returns the counters (kernels.launch.barrier_counters)."""
    if config is None:
        config = kernel_config.launch_config(cell, input.shape[1], H, input.dtype, input.device, backward=False)
    counters = barrier_counters(config, input.device)
    launch(barrier_floor_kernel, config, counters, counters, input.shape[0],
           max_polls=kernel_config.max_polls(input.device) if max_polls is None else max_polls)
    return counters
