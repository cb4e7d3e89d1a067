"""The floor of the kernels' steps, for the benchmarks: a kernel whose grid meets at the kernels' own
group barrier once per step and does nothing else."""
import torch
import triton
import triton.language as tl

from birnn_fast.kernels import config as kernel_config
from birnn_fast.kernels.common import group_barrier


@triton.jit
def barrier_floor_kernel(counter_ptr, steps, SYNC: tl.constexpr):
    """The grid meets at the group barrier, steps times."""
    p_counter = counter_ptr + tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    for s in range(0, steps):
        group_barrier(p_counter, (s + 1) * tl.num_programs(0), SYNC)


def barrier_floor(cell, input, H, config=None):
    """barrier_floor_kernel on the grid the forward takes for input (T, B, I) with equal lengths: as
    many barriers as its steps, T. Like the forward, it allocates its counters and launches from Python,
    so timings include that overhead. Returns the counters."""
    if config is None:
        config = kernel_config.launch_config(cell, input.shape[1], H, input.dtype, input.device, backward=False)
    counter = torch.zeros(2, config.n_bprog, dtype=torch.int32, device=input.device)
    options = kernel_config.launch_options(config)
    barrier_floor_kernel[(config.n_hblocks, config.n_bprog, 2)](
        counter, input.shape[0], SYNC=options["SYNC"], launch_cooperative_grid=options["launch_cooperative_grid"],
        num_warps=options["num_warps"])
    return counter
