"""What the launchers pick: the tile, the K split and the grid of a launch (``Config``), the dot
precision, and the launch options. Pure Python (no kernel here): the tests and the benchmarks call
``select_config`` for GPUs they do not have.

A launch's grid is (n_hblocks, n_bprog, 2): program (j, p, d) owns hidden units [j*BH, (j+1)*BH)
of direction d for batch blocks p, p + n_bprog, ... of BB rows each. The n_hblocks programs of a
(direction, batch blocks) group meet at a grid barrier once per step, which deadlocks unless every
program is resident at once: ``select_config`` never launches more programs than there are SMs, and
a grid with a barrier is launched cooperatively (``check_cooperative``).
"""
import collections
import contextlib
import dataclasses
import os
import threading

import torch
import triton

from birnn_fast.cells import CELLS as _CELL_TABLE

CELLS = {mode: cell.index for mode, cell in _CELL_TABLE.items()}
GATES = {mode: cell.gates for mode, cell in _CELL_TABLE.items()}
WORKSPACE = {mode: cell.saved for mode, cell in _CELL_TABLE.items()}

# K chunk of the per-step products when W_hh streams (tl.dot needs >= 16): 2-D tiles, as chunks split
# over the warps (NK > 1) spill at 32x16 and 16x32 in Triton 3.6.
STREAM_NK, STREAM_BK = 1, 32
# Software pipelining of the K loops costs registers (spills) and buys little: its loads hit L2.
NUM_STAGES = 1
# One program per SM by design, so each of its 256 threads may hold 255 registers; without the cap
# ptxas aims at 128 and spills.
MAX_REGISTERS = 255
NUM_WARPS = 8
# (BB, BH) tiles the launcher may pick on a GPU when W_hh streams: those the compile test finds free
# of spills for every cell and dtype on sm_80 and sm_90 (32x32, 64x16 and up spill).
STREAM_TILES = ((16, 16), (32, 16), (16, 32))
# The tile when W_hh stays in shared memory: the narrowest slice per program.
RESIDENT_TILE = (16, 16)
# Widest K chunk of a resident product (16 chunks at K = 1024, two per warp), as compiled in the tests.
RESIDENT_MAX_BK = 64
# The installed Triton's (major, minor): what compiles without spills depends on it.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# A barrier wait gives up after this many polls of its counter (each a round trip to L2, about a
# microsecond: seconds, far beyond any step) and the launcher raises; interpreted programs take turns
# under the GIL, so there only a hang far longer than any test's step gives up.
MAX_POLLS = {"cuda": 1 << 22, "interpreter": 1 << 30}
# Shared memory a resident program uses beyond its two operands (reductions, barriers): 1 KiB measured
# in the compile test, which holds every selectable configuration to its sm_80 / sm_90 limit.
RESIDENT_SHARED_SLACK = 2048

# FUSED (fused_gates): the forward's step takes one product of N = NG*BH columns for all gates
# (NG = 4 for LSTM, and for GRU with a zero fourth gate; 1 for RNN) instead of G products.
Config = collections.namedtuple("Config", "BB BH NK BK RESIDENT n_hblocks n_bprog FUSED", defaults=(False,))


def interpreted(device):
    """Whether kernels on this device run in Triton's interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def split_k(H, resident, fma_backward=False):
    """(NK, BK) of the per-step products. Resident: all of H in one pass, in chunks of BK, one per warp
    (NK = 8), or of 64 at most (NK = 16 at K = 1024). Streamed: 2-D chunks (NK = 1) of STREAM_BK per
    pass. fma_backward: the backward kernel with its products on the FMA units (fp32 without TF32),
    which at K = 32 takes one 2-D chunk instead of two: two chunks of 16 over the 8 warps take the
    LSTM's to 255 registers and a spill in the time loop on sm_80 (206-214 with one chunk), where the
    forward and the MMA products need two (one costs them 250-255 registers and spills)."""
    if not resident:
        return STREAM_NK, STREAM_BK
    k = max(16, triton.next_power_of_2(H))
    if fma_backward and k == 32:
        return 1, k
    BK = max(16, min(RESIDENT_MAX_BK, k // NUM_WARPS))
    return k // BK, BK


def uses_fma(dtype, dot_precision):
    """Whether the kernels' products run on the FMA units rather than tensor cores: fp32 without TF32."""
    return dtype == torch.float32 and dot_precision == "ieee"


def resident_max_k(cell, dtype, dot_precision, backward):
    """The largest padded H whose resident kernel runs its time loop without register spills (compile
    tests, sm_80 and sm_90): the LSTM and GRU backward hold the most live state, fp32 without TF32 takes
    the most registers (FMA-unit operands). Checked with Triton 3.9 and 3.6 (the GPU image's), which
    stands for every version before 3.9."""
    old_triton = TRITON_VERSION < (3, 9)
    if uses_fma(dtype, dot_precision):
        return 512 if cell.startswith("RNN") else 128 if old_triton else 256
    if backward and (cell == "GRU" or cell == "LSTM" and old_triton):
        return 512
    return 1024


def checked_triton():
    """Whether the installed Triton is one whose builds of fused_gates and double_buffered_backward
    the compile tests check without spills for every selectable configuration: 3.9 and later
    (tests/test_kernels_triton.py). Not 3.6 (the GPU image's and torch 2.11's pin): its builds of them
    (tests/test_triton_36.py) spill in the fused LSTM resident at K = 512 (sm_80, hinted); its
    double-buffered backward builds every streamed configuration for sm_90 without spills, sm_80's and
    the rest of the fused sweep not yet run."""
    return TRITON_VERSION >= (3, 9)


def fused_gates(cell, dtype, dot_precision, BB, BH, K, resident, backward):
    """Whether the forward kernel with this tile takes one product for all gates (Config.FUSED): where
    that compiles without spills for sm_80 and sm_90 (compile tests, Triton 3.9). Not: the backward
    (its products are of another shape), the GRU resident (its zero fourth gate would take a third
    more shared memory), the LSTM resident at K = 1024 (spills), fp32 without TF32 streamed in tiles
    of 16x32 (spills), and Triton versions the compile tests do not build (checked_triton)."""
    if backward or not checked_triton():
        return False
    if resident:
        return cell != "GRU" and not (cell == "LSTM" and K > 512)
    return not (uses_fma(dtype, dot_precision) and (BB, BH) == (16, 32))


def double_buffered_backward():
    """Whether the backward's streamed K loop loads the next chunk before this chunk's product (its
    DOUBLE_BUFFER): with a Triton whose builds of it the compile tests check (checked_triton); else
    the loop the 3.6 configurations were checked with by hand."""
    return checked_triton()


def resident_fits(cell, H, dtype, dot_precision, shared_bytes, backward):
    """Whether a program's W_hh slice and one (BB, K) operand of a step fit shared_bytes, with its time
    loop spill-free (resident_max_k)."""
    BB, BH = RESIDENT_TILE
    k = max(16, triton.next_power_of_2(H))
    element_size = torch.finfo(dtype).bits // 8
    return (k <= resident_max_k(cell, dtype, dot_precision, backward)
            and (GATES[cell] * BH + BB) * k * element_size + RESIDENT_SHARED_SLACK <= shared_bytes)


def select_config(cell, B, H, dtype, dot_precision, num_sms, shared_bytes, backward=False,
                  stream_tiles=STREAM_TILES):
    """Tile, K split and grid of the forward (or backward) kernel for B rows and H units: a ``Config``.

    The grid, 2 * n_hblocks * n_bprog programs, never exceeds num_sms, since the grid barrier needs
    every program of a group resident at once; a program runs ``rounds`` = ceil(n_bblocks / n_bprog)
    batch blocks per step. Candidates: ``stream_tiles``, and the resident one where ``resident_fits``.
    W_hh resident wherever it fits (each round then reads it from shared memory instead of L2), then
    the fewest rounds, then least work per round.
    """
    candidates = [(tile, False) for tile in stream_tiles]
    if resident_fits(cell, H, dtype, dot_precision, shared_bytes, backward):
        candidates.append((RESIDENT_TILE, True))
    best = None
    for (BB, BH), resident in candidates:
        n_hblocks = triton.cdiv(H, BH)
        n_bblocks = triton.cdiv(B, BB)
        n_bprog = min(n_bblocks, num_sms // (2 * n_hblocks))
        if n_bprog == 0:
            continue
        key = (not resident, triton.cdiv(n_bblocks, n_bprog), BB * BH, BB)
        if best is None or key < best[0]:
            NK, BK = split_k(H, resident, fma_backward=backward and uses_fma(dtype, dot_precision))
            fused = fused_gates(cell, dtype, dot_precision, BB, BH, NK * BK, resident, backward)
            best = key, Config(BB, BH, NK, BK, resident, n_hblocks, n_bprog, fused)
    if best is None:
        widest = max((BH for _, BH in stream_tiles), default=RESIDENT_TILE[1])
        raise ValueError(f"hidden size {H} needs {2 * triton.cdiv(H, widest)} co-resident programs, "
                         f"more than the {num_sms} SMs of this GPU")
    return best[1]


def interpreter_config(B, H, resident=True, fused=False):
    """The interpreter's launch: programs run one after another there, and a barrier waiting on another
    program of the group would never return, so one program holds every unit of a direction (one per
    batch block). ``resident=False`` streams W_hh in K chunks of 16 instead; ``fused``: Config.FUSED."""
    BB, BH = 16, max(16, triton.next_power_of_2(H))
    NK, BK = split_k(H, True) if resident else (1, 16)
    return Config(BB, BH, NK, BK, resident, 1, triton.cdiv(B, BB), fused)


def launch_config(cell, B, H, dtype, device, backward):
    """The Config a launcher picks for B rows and H units on ``device`` (see select_config)."""
    if interpreted(device):
        config = interpreter_config(B, H)
        return config._replace(FUSED=fused_gates(cell, dtype, "ieee", config.BB, config.BH, config.NK * config.BK,
                                                 True, backward))
    properties = torch.cuda.get_device_properties(device)
    return select_config(cell, B, H, dtype, dot_precision(dtype, device), properties.multi_processor_count,
                         getattr(properties, "shared_memory_per_block_optin", 48 * 1024), backward)


def launch_options(config):
    """The launch arguments both kernels take from a Config: constexprs and compile options (FUSED,
    the forward's only, its launcher passes)."""
    return dict(BB=config.BB, BH=config.BH, NK=config.NK, BK=config.BK, RESIDENT=config.RESIDENT,
                SYNC=config.n_hblocks > 1, launch_cooperative_grid=config.n_hblocks > 1, num_warps=NUM_WARPS,
                num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)


def fp32_precision():
    """"tf32" or "ieee": what torch's cuDNN RNN uses for fp32, the rule the kernels follow.

    torch >= 2.9 has per-op flags: ``torch.backends.cudnn.rnn.fp32_precision``, where "none" defers to
    ``torch.backends.cudnn.fp32_precision``, then to ``torch.backends.fp32_precision``. Reading the
    legacy ``torch.backends.cudnn.allow_tf32`` there raises a RuntimeError once cuDNN's conv and rnn
    flags were set apart; before 2.9 it is the only flag.
    """
    rnn = getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", None)
    if rnn is None:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    for precision in (rnn, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return "tf32" if precision == "tf32" else "ieee"
    return "ieee"


def _matmul_precision():
    """The fp32 precision torch's CUDA matmuls run in now: "tf32" or "ieee"."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return "tf32" if matmul.allow_tf32 else "ieee"
    for precision in (matmul.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return "tf32" if precision == "tf32" else "ieee"
    return "ieee"


def _set_matmul_precision(precision):
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = precision
    else:
        matmul.allow_tf32 = precision == "tf32"


def _saved_matmul_precision():
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision if hasattr(matmul, "fp32_precision") else ("tf32" if matmul.allow_tf32 else "ieee")


# The launchers of every thread share torch's one process-wide matmul flag: the first to enter sets
# it, the last to leave restores it (a count, not a stack: launchers in two threads end in any order).
_GEMM_LOCK = threading.Lock()
_gemm_state = {"users": 0, "saved": None}


@contextlib.contextmanager
def rnn_gemm_precision():
    """The launchers' cuBLAS products (input projection, dX, weight gradients) run in cuDNN's RNN fp32
    rule (fp32_precision), as nn.LSTM's whole layer does, not in torch.backends.cuda.matmul's: set on
    entry, restored on exit, written back exactly as the user left it (the new per-backend API keeps
    a legacy ``allow_tf32`` readable once restored). Nothing is set where the two rules agree. The
    flag is process-wide: a matmul another thread runs meanwhile sees the RNN rule too (torch has no
    thread-local one). Runs inside the ops' kernels, eagerly: torch.compile and export see the op,
    never this."""
    wanted = fp32_precision()
    with _GEMM_LOCK:
        # Only the first entrant sets (both read the same process-wide cuDNN rule).
        if _gemm_state["users"] == 0 and _matmul_precision() != wanted:
            _gemm_state["saved"] = _saved_matmul_precision()
            _set_matmul_precision(wanted)
        _gemm_state["users"] += 1
    try:
        yield
    finally:
        with _GEMM_LOCK:
            _gemm_state["users"] -= 1
            if _gemm_state["users"] == 0 and _gemm_state["saved"] is not None:
                _set_matmul_precision(_gemm_state["saved"])
                _gemm_state["saved"] = None


def dot_precision(dtype, device):
    """The input_precision of the kernels' fp32 dots: TF32 where cuDNN's RNN would use it (on CUDA; the
    interpreter computes in ieee). Triton's TF32 mma reads the fp32 operands' mantissas truncated to
    10 bits, where cuDNN and cuBLAS round them: the kernels round their operands first (tf32_rounded)."""
    if dtype == torch.float32 and not interpreted(device) and fp32_precision() == "tf32":
        return "tf32"
    return "ieee"


def tf32_rounded(tensor, precision):
    """tensor (fp32) rounded to the nearest TF32, ties away from zero, when precision is "tf32" (as
    common.tf32_rounded in the kernels); else tensor itself."""
    if precision != "tf32":
        return tensor
    bits = tensor.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def max_polls(device):
    """The launchers' bound on a barrier wait (MAX_POLLS) on device."""
    return MAX_POLLS["interpreter" if interpreted(device) else "cuda"]


def check_cooperative(compiled, kernel, config):
    """Raise unless a launch whose grid meets at a barrier was compiled for a cooperative launch: Triton
    drops or refuses launch options it does not know, and a non-cooperative launch of a grid that
    does not fit would hang at the barrier (until its bounded wait gives up)."""
    if config.n_hblocks > 1 and not getattr(getattr(compiled, "metadata", None), "launch_cooperative_grid", False):
        raise RuntimeError(f"{kernel} with {config} was not launched cooperatively: this Triton "
                           f"({triton.__version__}) ignored launch_cooperative_grid, and its grid barrier needs it")


def cooperative_launch_supported():
    """Whether this Triton's CUDA backend knows the launch_cooperative_grid option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in {field.name for field in dataclasses.fields(CUDAOptions)}
