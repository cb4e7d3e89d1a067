"""Offline builds of the kernels as the launchers launch them, and what their SASS says: registers,
shared memory, spills in the time loop, and the shape of a round (the loads a round waits on before
its first matrix product, its CTA barriers). No GPU needed: Triton compiles for a named target.

Run in a process without TRITON_INTERPRET (triton.jit gives compilable functions only then).
"""
import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from birnn_fast.kernels import backward as kernels_backward
from birnn_fast.kernels import config as kernels
from birnn_fast.kernels import forward as kernels_forward

KERNELS = {"birnn_forward_kernel": kernels_forward.birnn_forward_kernel,
           "birnn_backward_kernel": kernels_backward.birnn_backward_kernel}
# Each kernel's VARIANTS (launch options, off by default): name -> constexpr.
KERNEL_VARIANTS = {"birnn_forward_kernel": kernels_forward.VARIANTS, "birnn_backward_kernel": kernels_backward.VARIANTS}
# The exchange buffers, of tagged words (common.tagged_words) in a TAGGED build.
EXCHANGE_POINTERS = {"hbuf_ptr", "gbuf_ptr"}
SIGNATURE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Pointers whose element type does not follow the input's: the launchers allocate these fp32 (the
# workspace and gate gradients for half inputs too, and every fp32 state buffer).
FP32_POINTERS = {"ws_ptr", "dgates_ptr", "state_ptr"}
INT_POINTERS = {"lengths_ptr": "*i64", "counter_ptr": "*i32", "timing_ptr": "*i64"}
# The integer arguments the JIT marks divisible by 16 when they are (T, B, H at realistic sizes).
HINTED_INTS = {"T", "B", "H"}


def signature_of(fn, dtype, constexprs):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT_POINTERS:
            signature[name] = INT_POINTERS[name]
        elif name in EXCHANGE_POINTERS and constexprs.get("TAGGED"):
            signature[name] = "*i64" if dtype == torch.float32 else "*i32"  # common.tagged_words
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS or dtype == torch.float32 else "*" + SIGNATURE_DTYPES[dtype]
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(fn_name, cell, dtype, precision, BB, BH, NK, BK, RESIDENT, cc, hints=False, fused=None,
                   timing=False, variants=()):
    """The cubin of a kernel as its launcher launches it on a grid with a barrier: its constexprs and
    launch options (which must all be options of this Triton's CUDA backend). hints: the
    divisibility-by-16 attributes the JIT adds to 16-byte aligned pointers and to T, B and H when they
    are multiples of 16; without, none (H, B, T odd and the tensors' storage not known aligned).
    fused: the forward's FUSED, by default what select_config picks for the configuration. timing: the
    forward's TIMING build (its %globaltimer stamps); off, as the launcher launches it by default.
    variants: names of the kernel's VARIANTS to switch on (the others off, as by default)."""
    fn = KERNELS[fn_name]
    launch = kernels.launch_options(kernels.Config(BB, BH, NK, BK, RESIDENT, n_hblocks=2, n_bprog=1))
    constexprs = {name: launch.pop(name) for name in list(launch) if name in fn.arg_names}
    if "FUSED" in fn.arg_names:  # the forward's
        if fused is None:
            fused = kernels.fused_gates(cell, dtype, precision, BB, BH, NK * BK, RESIDENT, backward=False)
        constexprs["FUSED"] = fused
    unknown = set(variants) - set(KERNEL_VARIANTS[fn_name])
    assert not unknown, f"variants {sorted(unknown)} are not {fn_name}'s"
    for name, constexpr in KERNEL_VARIANTS[fn_name].items():
        constexprs[constexpr] = name in variants
    if "TIMING" in fn.arg_names:  # the forward's
        constexprs["TIMING"] = timing
        if not timing:
            constexprs["timing_ptr"] = None
    if "DOUBLE_BUFFER" in fn.arg_names:  # the backward's
        constexprs["DOUBLE_BUFFER"] = kernels.double_buffered_backward()
    constexprs.update(CELL=kernels.CELLS[cell], G=kernels.GATES[cell], W=kernels.WORKSPACE[cell],
                      DOT_PRECISION=precision)
    if "SAVE" in fn.arg_names:
        # SAVE=False (inference) only drops the workspace stores: SAVE=True bounds its registers.
        constexprs["SAVE"] = True
    signature = signature_of(fn, dtype, constexprs)
    attrs = {}
    if hints:
        attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(fn.arg_names)
                 if signature[name].startswith("*") or name in HINTED_INTS}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    from triton.backends.nvidia.compiler import CUDAOptions

    unknown = set(launch) - {field.name for field in dataclasses.fields(CUDAOptions)}
    assert not unknown, f"launch options this Triton does not know: {unknown}"
    return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=launch)


def cuobjdump(compiled, flag):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, flag, cubin.name], capture_output=True, text=True, check=True).stdout


@dataclasses.dataclass
class Instruction:
    address: int
    op: str
    write_barrier: int  # the scoreboard this instruction's result sets (7: none)
    wait_mask: int  # the scoreboards it waits on before issuing


GLOBAL_LOADS = re.compile(r"^(@!?U?P\w+ )?(LDG|LD|ATOMG|ATOM)\b")
MMAS = re.compile(r"^(@!?U?P\w+ )?(HMMA|HGMMA|IMMA|DMMA)\b")
BARRIERS = re.compile(r"^(@!?U?P\w+ )?BAR\.")
SPILLS = re.compile(r"\b(STL|LDL)\b")


def instructions(sass):
    """The SASS of a cuobjdump --dump-sass, one Instruction each, with its scheduling control bits (sm_70
    and later: bits 105-125 of the 128-bit encoding, the high word's bits 41-63)."""
    lines = sass.splitlines()
    code = []
    for index, line in enumerate(lines[:-1]):
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* 0x[0-9a-f]{16} \*/", line)
        high = re.match(r"\s*/\* (0x[0-9a-f]{16}) \*/\s*$", lines[index + 1])
        if match and high:
            control = int(high.group(1), 16) >> 41
            code.append(Instruction(int(match.group(1), 16), match.group(2).strip(), (control >> 5) & 7,
                                    (control >> 11) & 0x3F))
    return code


def loops(code):
    """(head, last) address ranges of the loops: a branch back to an earlier address closes one."""
    found = []
    for instruction in code:
        branch = re.search(r"\bBRA\b.*0x([0-9a-f]+)\s*$", instruction.op)
        if branch and int(branch.group(1), 16) < instruction.address:
            found.append((int(branch.group(1), 16), instruction.address))
    return found


def _outermost(ranges, address, within=None):
    inside = [(head, last) for head, last in ranges if head <= address <= last
              and (within is None or (within[0] <= head and last <= within[1] and (head, last) != within))]
    return min(inside, key=lambda r: (r[0], -r[1])) if inside else None


def dependent_loads(code, start, end):
    """The chain of global-memory round trips from start to end: a wait on a global load issued since
    the last counted wait adds one (loads issued together and waited on in turn count once)."""
    return _chain(instruction for instruction in code if start <= instruction.address < end)


def _chain(code):
    """dependent_loads over the instructions of code, in the order given."""
    pending = {}  # scoreboard -> epoch at which a global load set it
    depth = 0
    for instruction in code:
        waited = [pending.pop(board) for board in range(6) if instruction.wait_mask >> board & 1 and board in pending]
        if any(epoch == depth for epoch in waited):
            depth += 1
        if instruction.write_barrier < 6:
            if GLOBAL_LOADS.match(instruction.op):
                pending[instruction.write_barrier] = depth
            else:
                pending.pop(instruction.write_barrier, None)
    return depth


ARRIVE = re.compile(r"^(@!?U?P\w+ )?ATOMG\.E\.ADD\b")
# What orders memory between programs: fences (MEMBAR, FENCE), atomics that return a value (ATOMG,
# ATOM: the thread waits for the answer where it uses it), reductions (RED, REDG: no answer), L1
# invalidations (CCTL, an acquire's), strong loads (LDG.E.STRONG: volatile or relaxed / acquire).
SYNC_OPS = {"FENCES": re.compile(r"^(@!?U?P\w+ )?(MEMBAR|FENCE)\b"),
            "RETURNING_ATOMICS": re.compile(r"^(@!?U?P\w+ )?(ATOMG|ATOM)\."),
            "REDUCTIONS": re.compile(r"^(@!?U?P\w+ )?(REDG|RED)\."),
            "INVALIDATES": re.compile(r"^(@!?U?P\w+ )?CCTL\b"),
            "STRONG_LOADS": re.compile(r"^(@!?U?P\w+ )?LDG\.E\S*\.STRONG\.")}
# The exchange's reads in the TAGGED build (common.tagged_issue: .cg loads of 32- or 64-bit words, vectorised
# to 64 or 128 bits where the JIT knows the rows aligned).
TAGGED_POLL = re.compile(r"^(@!?U?P\w+ )?LDG\.E(\.64|\.128)?\.STRONG\.GPU\b")


def _barrier_points(in_time):
    """Addresses of the grid barrier's wait (the acquire's CCTL.IVALL) and arrive (the release's
    ATOMG.E.ADD) in the time loop, or None."""
    acquire = next((i.address for i in in_time if i.op.startswith("CCTL.IVALL")), None)
    arrive = next((i.address for i in in_time if ARRIVE.match(i.op)), None)
    return acquire, arrive


def _cyclic(in_time, start, end):
    """The instructions after start and before end, in the order a step runs them: through the time
    loop's back edge where end comes first in the code."""
    if start < end:
        return [i for i in in_time if start < i.address < end]
    return [i for i in in_time if i.address > start] + [i for i in in_time if i.address < end]


def wait_to_arrive(in_time):
    """The dependent global loads (as dependent_loads) from the grid barrier's wait to the program's
    next arrive: the memory round trips on a step's critical path between two barriers (a static
    count: the loads of a step's later rounds count too). None without a barrier."""
    acquire, arrive = _barrier_points(in_time)
    return None if acquire is None or arrive is None else _chain(_cyclic(in_time, acquire, arrive))


def arrive_to_wait(in_time, ranges):
    """The global loads issued between the program's arrive and its wait (the poll loop's own
    excepted): the loads that overlap the wait instead of lying on the critical path. None without a
    barrier."""
    acquire, arrive = _barrier_points(in_time)
    if acquire is None or arrive is None:
        return None
    poll = min((r for r in ranges if r[0] <= acquire <= r[1]), key=lambda r: r[1] - r[0], default=(acquire, acquire))
    return sum(1 for i in _cyclic(in_time, arrive, poll[0]) if GLOBAL_LOADS.match(i.op))


def _time_loop(code, ranges):
    """The time loop: the outermost loop around the group barrier's first atomic or, in the TAGGED
    build (no barrier), around the exchange's first poll."""
    anchors = [i.address for i in code if "ATOMG" in i.op] or [i.address for i in code if TAGGED_POLL.match(i.op)]
    return _outermost(ranges, min(anchors))


def round_shape(sass):
    """What a step of the time loop looks like in SASS: for the round (the loop over the program's
    batch blocks) that holds the first matrix product, the dependent global loads before that product
    (dependent_loads, from the round's start or the last barrier poll before it) and all its global
    loads there; the dependent global loads from the barrier's wait to the next arrive
    (wait_to_arrive), and the loads issued between arrive and wait (arrive_to_wait); the CTA barriers (BAR) of a step at one round, with those of an inner K loop
    apart, and the dependent global loads a K chunk waits on before its last product
    (K_CHUNK_DEPENDENT_LOADS); spill instructions in the time loop, and its instructions of each of
    SYNC_OPS (LOOP_FENCES, LOOP_RETURNING_ATOMICS, ...), and the whole kernel's (KERNEL_FENCES, ...:
    they hold whatever the loop heuristics take for the time loop)."""
    code = instructions(sass)
    ranges = loops(code)
    time_loop = _time_loop(code, ranges)
    in_time = [instruction for instruction in code if time_loop[0] <= instruction.address <= time_loop[1]]
    mmas = [instruction.address for instruction in in_time if MMAS.match(instruction.op)]
    shape = {"LOOP_SPILLS": sum(1 for instruction in in_time if SPILLS.search(instruction.op)),
             "WAIT_TO_ARRIVE": wait_to_arrive(in_time), "ARRIVE_TO_WAIT": arrive_to_wait(in_time, ranges)}
    shape.update({f"LOOP_{name}": sum(1 for i in in_time if pattern.match(i.op)) for name, pattern in SYNC_OPS.items()})
    shape.update({f"KERNEL_{name}": sum(1 for i in code if pattern.match(i.op)) for name, pattern in SYNC_OPS.items()})
    inner = [r for r in ranges if time_loop[0] <= r[0] and r[1] <= time_loop[1] and r != time_loop]
    # The innermost loops holding a product are its K loop (streamed) or, resident, its round loop.
    k_loops = [r for r in inner if any(r[0] <= m <= r[1] for m in mmas)
               and not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in inner if any(o[0] <= m <= o[1] for m in mmas))]
    barriers = [instruction.address for instruction in in_time if BARRIERS.match(instruction.op)]
    in_k = [b for b in barriers if any(head <= b <= last for head, last in k_loops)]
    shape["BARRIERS"] = len(barriers) - len(in_k)
    shape["BARRIERS_PER_K_CHUNK"] = len(in_k)
    # A K chunk's own round trips: those its products wait on, from the K loop's head to its last
    # product (none where the chunk's operands were loaded during the previous chunk's products).
    shape["K_CHUNK_DEPENDENT_LOADS"] = max(
        (_chain(i for i in in_time if head <= i.address <= max(m for m in mmas if head <= m <= last))
         for head, last in k_loops), default=None)
    if not mmas:
        shape["DEPENDENT_LOADS"] = shape["LOADS_BEFORE_MMA"] = None
        return shape
    first = mmas[0]
    round_loop = _outermost(ranges, first, within=time_loop) or time_loop
    start = round_loop[0]
    # An acquire (the barrier's poll) invalidates L1 with CCTL.IVALL: what a round loads after it waits
    # for the barrier.
    acquires = [i.address for i in code if start <= i.address < first and i.op.startswith("CCTL.IVALL")]
    if acquires:
        start = max(acquires) + 1
    shape["DEPENDENT_LOADS"] = dependent_loads(code, start, first)
    shape["LOADS_BEFORE_MMA"] = sum(1 for instruction in code
                                    if start <= instruction.address < first and GLOBAL_LOADS.match(instruction.op))
    return shape
