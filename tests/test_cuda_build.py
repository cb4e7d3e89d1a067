"""The CUDA kernels built from the checkout (csrc/cuda/build.py, sm_90a, and sm_80 for the l2
exchange's, no GPU needed) and what their compiled code says: every instance the plan can pick is
there, no local memory, spills or stack, and the step loop of each is the design
(csrc/cuda/README.md): tensor-core MMAs on h from shared memory, W_hh never re-read from global
memory, h sent to the peers by bulk copies into their shared memory and waited for on mbarriers
(the cluster kernels) or as step-tagged words through L2 polled with GPU-scope loads (the l2
kernels), no GPU-wide fence. Skipped where nvcc is missing."""
import importlib.util
import os
import pathlib
import re
import subprocess

import pytest

from birnn_fast import cuda_schedule as schedule

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "triton" / "backends" / "nvidia" / "bin"


def _load_build():
    spec = importlib.util.spec_from_file_location("birnn_cuda_build", ROOT / "csrc" / "cuda" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()


def cuobjdump():
    try:
        import triton
        tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    except ImportError:
        tool = BIN / "cuobjdump"
    return str(tool) if tool.exists() else None


def built_cubins(tmp_path_factory, arch):
    """arch's cubins (build.units(arch)) built once from the checkout's sources: their folder."""
    if build.nvcc() is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path_factory.mktemp(f"cubins_{arch}")
    paths = build.build(out, archs=arch)
    assert sorted(path.name for path in paths) == sorted(f"{unit[0]}.sm_{arch}.cubin" for unit in build.units(arch))
    return out


@pytest.fixture(scope="session")
def cubins(tmp_path_factory):
    """The sm_90a cubins, built once per session."""
    return built_cubins(tmp_path_factory, "90a")


@pytest.fixture(scope="session")
def cubins_80(tmp_path_factory):
    """The sm_80 cubins (the l2 exchange's units only: no clusters there), built once per session."""
    return built_cubins(tmp_path_factory, "80")


def addressed_sass(folder, pattern):
    """{function: [(address, instruction)]} of the cubins in folder matching pattern."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump (Triton's wheel carries one) is not installed")
    functions = {}
    for cubin in sorted(folder.glob(pattern)):
        text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        for block in re.split(r"\n\s*Function : ", text)[1:]:
            name, _, body = block.partition("\n")
            functions[name.strip()] = [(int(m.group(1), 16), m.group(2).strip())
                                       for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
    return functions


@pytest.fixture(scope="session")
def l2_sass(cubins, cubins_80):
    """The l2 kernels' SASS by architecture: {"90a": {function: [(address, instruction)]}, "80": ...}."""
    return {"90a": addressed_sass(cubins, "forward_*_l2*.cubin"), "80": addressed_sass(cubins_80, "*.cubin")}


@pytest.fixture(scope="session")
def sass(cubins):
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump (Triton's wheel carries one) is not installed")
    text = "".join(subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
                   for cubin in sorted(cubins.glob("*ward_*.cubin")))
    functions = {}
    for block in re.split(r"\n\s*Function : ", text)[1:]:
        name, _, body = block.partition("\n")
        functions[name.strip()] = [line.split(";")[0].split("*/")[-1].strip() for line in body.splitlines()
                                   if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
    return functions


def ptxas_entries(folder, arch):
    report = "".join(path.read_text() for path in sorted(folder.glob("*.ptxas.txt")))
    return re.findall(rf"Compiling entry function '(\w+)' for 'sm_{arch}'\n.*?Function properties for \1\n"
                      r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                      r"ptxas info\s*: Used (\d+) registers([^\n]*)", report, re.S)


L2_NAMES = sorted(schedule.kernel_name(*instance, "l2") for instance in schedule.L2_INSTANCES)


def test_every_instance_is_built_without_local_memory(cubins, cubins_80):
    entries = ptxas_entries(cubins, "90a")
    names = {schedule.kernel_name(*instance) for instance in schedule.INSTANCES} | set(L2_NAMES)
    assert {entry[0] for entry in entries if entry[0].startswith("birnn_forward_")} == names
    entries_80 = ptxas_entries(cubins_80, "80")
    assert {entry[0] for entry in entries_80} == set(L2_NAMES)
    entries += entries_80
    names = {schedule.backward_kernel_name(*instance) for instance in schedule.BACKWARD_INSTANCES}
    assert {entry[0] for entry in entries if entry[0].startswith("birnn_backward_")} == names
    for name, stack, spill_stores, spill_loads, registers, rest in entries:
        assert (stack, spill_stores, spill_loads) == ("0", "0", "0"), (name, stack, spill_stores, spill_loads)
        assert "lmem" not in rest and int(registers) <= 255, (name, registers, rest)


def step_loop(lines):
    """The instructions between the prologue's cluster barrier and the closing one's fence: the step
    loop and the padding loop after it."""
    start = next(i for i, line in enumerate(lines) if line.startswith("UCGABAR_WAIT")) + 1
    while lines[start].startswith(("CCTL", "NOP")):  # the acquire's L1 invalidate
        start += 1
    end = max(i for i, line in enumerate(lines) if line.startswith("UCGABAR_ARV"))
    while lines[end - 1].startswith(("MEMBAR", "NOP", "ERRBAR", "CGAERRBAR")):  # the release's fences
        end -= 1
    return lines[start:end]


@pytest.mark.parametrize("name", sorted(schedule.kernel_name(*instance) for instance in schedule.INSTANCES))
def test_step_loop_is_the_design(sass, name):
    lines = sass[name]
    loop = step_loop(lines)
    # The MMA of the kernel's dtype (SASS writes the fp16 one without a suffix; fp32: m16n8k8 TF32).
    wide = "_tf32_" in name or "_fp32_" in name
    mma = "HMMA.1688.F32.TF32" if wide else "HMMA.16816.F32.BF16" if "_bf16_" in name else "HMMA.16816.F32"

    opcodes = [line.split()[1] if line.startswith("@") else line.split()[0] for line in loop]
    assert mma in opcodes and not [op for op in opcodes if op.startswith("HMMA") and op != mma], \
        "the m16n8k16 tensor-core MMA of the kernel's dtype"
    assert "LDSM.16.M88.4" in opcodes, "h's B fragments by ldmatrix.x4 from shared memory"
    assert "UBLKCP.S.S" in opcodes, "h sent to the peers by a shared::cluster bulk copy"
    assert any(op.startswith("SYNCS.PHASECHK.TRANS64") for op in opcodes), "the mbarrier wait for the peers' h"
    assert any(op.startswith("SYNCS.ARRIVE.TRANS64") for op in opcodes), "the mbarrier re-armed with its bytes"
    # W_hh is loaded once, before the loop; the only global loads left in the loop are the input
    # projection's: a unit's 8-byte row of four gates (LSTM, GRU) or its one gate (RNN), one a
    # column of each batch tile the warp owns, which the compiler may emit on two paths (the first
    # step, without the wait, and the others). Reloading even one K tile of W_hh would take 8 a warp.
    global_loads = [op for op in opcodes if op.startswith("LDG")]
    split = int(re.search(r"_s(\d+)_", name).group(1))
    # fp32: 16-byte rows (LSTM, GRU) or one fp32; where they are loaded late (S = 2), prefetched to
    # L1 before the wait (CCTL.E.PF1), one a load.
    width = {(False, True): "LDG.E.U16", (False, False): "LDG.E.64", (True, True): "LDG.E",
             (True, False): "LDG.E.128"}[wide, "_elman_" in name]
    assert 0 < len(global_loads) <= 2 * 2 * -(-8 // split), len(global_loads)
    assert all(op == width for op in global_loads), sorted(set(global_loads))
    fences = [op for op in opcodes if op.startswith("MEMBAR") and not op.endswith(".CTA")]
    assert not fences, f"a fence wider than the CTA in the step loop: {fences}"
    prefetches = [op for op in opcodes if op == "CCTL.E.PF1"]
    assert len(prefetches) <= (len(global_loads) if wide and split == 2 else 0), prefetches
    assert not [op for op in opcodes if op.startswith(("ATOM", "RED", "UCGABAR", "CCTL")) and op != "CCTL.E.PF1"]
    if wide:
        # The TF32 kernels' MMAs: one a product (tf32) or three (fp32: 3xTF32), and the operands
        # rounded to TF32 in the loop (h's each step; the 3xTF32 split of W_hh's tiles too).
        twin = sass[name.replace("_fp32_", "_tf32_")]
        count = lambda lines_: sum(line.split()[0].startswith("HMMA") for line in step_loop(lines_))  # noqa: E731
        assert count(lines) == (3 if "_fp32_" in name else 1) * count(twin), (count(lines), count(twin))
    everywhere = [line.split()[1] if line.startswith("@") else line.split()[0] for line in lines]
    assert not [op for op in everywhere if op.startswith(("LDL", "STL"))], "local memory"


@pytest.mark.parametrize("name", sorted(schedule.backward_kernel_name(*instance)
                                         for instance in schedule.BACKWARD_INSTANCES))
def test_backward_step_loop_is_the_design(sass, name):
    """The backward's step loop: MMAs of W_hh^T (on chip) by the CTA's gate gradients from shared
    memory, partial sums sent by st.async into the peers' shared memory and waited for on an
    mbarrier, no fence wider than the CTA, no atomics, and no global load but the step's own inputs."""
    lines = sass[name]
    loop = step_loop(lines)
    wide = "_tf32_" in name or "_fp32_" in name
    mma = "HMMA.1688.F32.TF32" if wide else "HMMA.16816.F32.BF16" if "_bf16_" in name else "HMMA.16816.F32"
    opcodes = [line.split()[1] if line.startswith("@") else line.split()[0] for line in loop]
    assert mma in opcodes and not [op for op in opcodes if op.startswith("HMMA") and op != mma]
    assert "LDSM.16.M88.4" in opcodes, "the gate gradients' B fragments by ldmatrix.x4 from shared memory"
    assert "STAS.64" in opcodes, "partial sums sent by st.async (8 bytes) into the peers' shared memory"
    assert any(op.startswith("SYNCS.PHASECHK.TRANS64") for op in opcodes), "the mbarrier wait for the peers' sums"
    assert any(op.startswith("SYNCS.ARRIVE.TRANS64") for op in opcodes), "the mbarrier re-armed with its bytes"
    # Global loads in the loop: grad_output and the state a step started from (16-bit: c0 / h0 /
    # output), the forward's saved activations (fp32), for the lane's 4 elements, on at most two
    # paths. One K tile of W_hh re-read would add 8 16-bit loads a lane.
    family = next(cell for cell, family in schedule.FAMILIES.items() if f"_{family}_" in name)
    saved = schedule.cell_of(family).saved
    loads = [op for op in opcodes if op.startswith("LDG")]
    if wide:
        # All fp32, for the lane's 4 elements: grad_output, the saved slots and the state the step
        # started from, read from two places (the LSTM's c from the workspace or c0, the GRU's h from
        # the output or h0); the RNN's grad_output and h on two paths. The count the compiler emits:
        # one fragment of W_hh re-read would add 4 loads a lane.
        assert 0 < len(loads) <= 4 * (saved + 3 if saved else 4), loads
        assert set(loads) == {"LDG.E"}, sorted(set(loads))
    else:
        assert 0 < len([op for op in loads if op == "LDG.E.U16"]) <= 2 * 4 * 2, loads
        assert len([op for op in loads if op == "LDG.E"]) <= 2 * 4 * (saved + 1), loads
        assert set(loads) <= {"LDG.E.U16", "LDG.E"}, sorted(set(loads))
    fences = [op for op in opcodes if op.startswith("MEMBAR") and not op.endswith(".CTA")]
    assert not fences, f"a fence wider than the CTA in the step loop: {fences}"
    assert not [op for op in opcodes if op.startswith(("ATOM", "RED", "UCGABAR"))]
    # The wait's cluster-scope acquire (st.async releases at cluster scope): an L1 invalidate right
    # after a completed try_wait, nothing else of the kind.
    for index, line in enumerate(loop):
        if "CCTL" in line:
            assert "CCTL.IVALL" in line and "SYNCS.PHASECHK" in loop[index - 1], (line, loop[index - 1])
    if wide:
        # One TF32 MMA a product (tf32) or three (fp32: 3xTF32): every (M tile, K tile, batch tile)
        # of the largest plan the variant takes, unrolled.
        twin = sass[name.replace("_fp32_", "_tf32_")]
        count = lambda lines_: sum(line.split()[1 if line.startswith("@") else 0].startswith("HMMA")  # noqa: E731
                                   for line in step_loop(lines_))
        rows = int(name.rsplit("_r", 1)[1])
        n_tiles, k_tiles, warp_m_tiles, _ = schedule.backward_bounds(schedule.cell_of(family).gates, rows, "fp32")
        assert count(twin) == n_tiles * k_tiles * warp_m_tiles, count(twin)
        assert count(lines) == (3 if "_fp32_" in name else 1) * count(twin), (count(lines), count(twin))
    everywhere = [line.split()[1] if line.startswith("@") else line.split()[0] for line in lines]
    assert not [op for op in everywhere if op.startswith(("LDL", "STL"))], "local memory"


def test_build_honours_the_arch_list(monkeypatch):
    if build.nvcc() is None:
        pytest.skip("nvcc is not installed")
    monkeypatch.setenv("BIRNN_FAST_CUDA_ARCHS", "sm_90a")
    assert build.archs_to_build(build.nvcc()) == ("90a",)
    monkeypatch.setenv("BIRNN_FAST_CUDA_ARCHS", "8.0;90a")
    assert build.archs_to_build(build.nvcc()) == ("80", "90a")
    assert build.units("80") == build.L2_UNITS and set(build.L2_UNITS) < set(build.units("90a"))
    monkeypatch.setenv("BIRNN_FAST_CUDA_ARCHS", "75;90a")
    with pytest.raises(SystemExit, match="sm_75 is not built: the kernels need sm_80 or thread-block clusters"):
        build.archs_to_build(build.nvcc())
    monkeypatch.delenv("BIRNN_FAST_CUDA_ARCHS")
    assert "90a" in build.archs_to_build(build.nvcc())


def l2_step_loop(instructions):
    """The l2 kernel's step loop: the innermost loop (a backward branch and its target) holding every
    MMA, poll and publishing store."""
    def opcode(text):
        parts = text.split()
        return parts[1] if parts[0].startswith("@") else parts[0]

    marks = [address for address, text in instructions
             if opcode(text).startswith("HMMA") or "STRONG.GPU" in opcode(text)]
    low, high = min(marks), max(marks)
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA (?:\S+ )?0x([0-9a-f]+)", text)
        if branch and opcode(text) == "BRA" and int(branch.group(1), 16) <= low and address >= high:
            loops.append((address - int(branch.group(1), 16), int(branch.group(1), 16), address))
    assert loops, "no loop holds the MMAs, the polls and the publishing stores"
    _, start, end = min(loops)
    return [opcode(text) for address, text in instructions if start <= address <= end]


@pytest.mark.parametrize("arch", ["90a", "80"])
@pytest.mark.parametrize("name", L2_NAMES)
def test_l2_step_loop_is_the_design(l2_sass, arch, name):
    """The l2 kernel's step loop: the MMAs of its dtype on h from shared memory (ldmatrix), the
    other CTAs' words polled with GPU-scope 64-bit loads (LDG.E.64.STRONG.GPU: at L2, never a stale
    L1 line) and h_{s+1} published with GPU-scope 64-bit stores, no fence, atomic or L1 invalidation
    (the tag in each word replaces them: no grid barrier), CTA barriers only, W_hh not re-read from
    global memory; on sm_80 no cluster instruction anywhere."""
    instructions = l2_sass[arch][name]
    loop = l2_step_loop(instructions)
    wide = "_tf32_" in name or "_fp32_" in name
    mma = "HMMA.1688.F32.TF32" if wide else "HMMA.16816.F32.BF16" if "_bf16_" in name else "HMMA.16816.F32"
    assert mma in loop and not [op for op in loop if op.startswith("HMMA") and op != mma]
    assert "LDSM.16.M88.4" in loop, "h's B fragments by ldmatrix.x4 from the staged buffer"
    polls = [op for op in loop if op == "LDG.E.64.STRONG.GPU"]
    # kL2Batch words issued at once, and re-read (the compiler may emit either twice).
    assert 8 <= len(polls) <= 4 * 8, len(polls)
    publishes = [op for op in loop if op == "STG.E.64.STRONG.GPU"]
    split = int(re.search(r"_s(\d+)_", name).group(1))
    assert 0 < len(publishes) <= 2 * (2 if wide else 1) * -(-8 // split), len(publishes)
    # Global loads besides the polls: the input projection's, as the cluster kernels' (one a column of
    # each batch tile the warp owns, on at most two paths). One K tile of W_hh would add 8 a warp.
    loads = [op for op in loop if op.startswith("LDG") and op != "LDG.E.64.STRONG.GPU"]
    width = {(False, True): "LDG.E.U16", (False, False): "LDG.E.64", (True, True): "LDG.E",
             (True, False): "LDG.E.128"}[wide, "_elman_" in name]
    assert 0 < len(loads) <= 2 * 2 * -(-8 // split), loads
    assert set(loads) == {width}, sorted(set(loads))
    assert not [op for op in loop if "STRONG" in op and op not in ("LDG.E.64.STRONG.GPU", "STG.E.64.STRONG.GPU")]
    forbidden = [op for op in loop if op.startswith(("MEMBAR", "ATOM", "RED", "ERRBAR", "UCGABAR", "SYNCS", "UBLKCP",
                                                     "STAS", "FENCE")) or (op.startswith("CCTL") and op != "CCTL.E.PF1")]
    assert not forbidden, f"a fence, atomic or cluster instruction in the l2 step loop: {forbidden}"
    barriers = [op for op in loop if op.startswith("BAR")]
    assert barriers and set(barriers) == {"BAR.SYNC.DEFER_BLOCKING"} and len(barriers) <= 4, barriers
    everywhere = [text.split()[1] if text.startswith("@") else text.split()[0] for _, text in instructions]
    assert not [op for op in everywhere if op.startswith(("LDL", "STL"))], "local memory"
    assert not [op for op in everywhere if op.startswith(("MEMBAR", "ATOM", "RED", "UCGABAR", "SYNCS", "UBLKCP",
                                                          "STAS", "MAPA"))], "a fence, atomic or cluster instruction"
