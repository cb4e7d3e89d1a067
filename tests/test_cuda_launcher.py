"""The CUDA kernels' launcher (birnn_fast/cuda_kernels.py) without a GPU: it imports and says why it
cannot run, its kernel argument is the CUDA struct byte for byte, its input projection is the
layout the schedule reads, its launch configurations follow the plan, and the Triton backward it
hands the gradients to reads the forward's workspace (the model's, run on the CPU) correctly."""
import ctypes
import itertools
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from birnn_fast import cuda_kernels, cuda_schedule as schedule, reference

from conftest import interpreted_triton
from test_cuda_schedule import lstm_layer, mixed_lengths

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_reasons_without_a_gpu():
    assert "CUDA tensors" in cuda_kernels.why_not("cpu", torch.bfloat16, "LSTM", 64)
    assert "float64" in cuda_kernels.why_not("cuda", torch.float64, "LSTM", 64)
    # Past one cluster the l2 exchange's plan takes the layer (the device decides the rest); past it
    # both reasons.
    reason = cuda_kernels.why_not("cuda", torch.float16, "LSTM", 2048, 64)
    assert "one cluster" in reason and "l2 exchange" in reason and "shared memory" in reason
    assert "l2 exchange within 132 SMs" in cuda_kernels.why_not("cuda", torch.float32, "LSTM", 1024, 64)
    for dtype, H in ((torch.float16, 1024), (torch.float32, 512), (torch.float32, 272)):
        reason = cuda_kernels.why_not("cuda", dtype, "LSTM", H, 64)
        assert reason is None or "cannot run this layer" not in reason, reason
    # fp32's backward takes the LSTM to H = 384 at B = 16, its forward to 416.
    assert cuda_kernels.why_not("cuda", torch.float32, "LSTM", 392, 16) == \
        cuda_kernels.why_not("cuda", torch.float32, "LSTM", 384, 16, backward=True)
    assert "shared memory" in cuda_kernels.why_not("cuda", torch.float32, "LSTM", 392, 16, backward=True)
    assert "proj_size" in cuda_kernels.why_not("cuda", torch.float16, "LSTM", 64, projections=True)
    if not torch.cuda.is_available():
        reason = cuda_kernels.why_not("cuda", torch.bfloat16, "LSTM", 64, 16)
        assert reason is not None and ("cuda-bindings" in reason or "no CUDA device" in reason)
        input = torch.randn(3, 2, 4, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            cuda_kernels.forward_op("LSTM", input, *lstm_args(input, 8))


def lstm_args(input, H):
    T, B, I = input.shape
    weights = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)] * 2
    weights = [w.to(input.dtype) for w in weights]
    h0 = torch.randn(2, B, H, dtype=input.dtype)
    return weights, h0, torch.randn_like(h0), torch.full((B,), T, dtype=torch.int64), True


@pytest.mark.parametrize("struct", ["ForwardParams", "BackwardParams", "L2Params"])
def test_params_struct_matches_cuda(struct):
    """Offsets and size of the kernels' arguments as nvcc lays out schedule.cuh's structs."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    params = getattr(cuda_kernels, struct)
    fields = [name for name, _ in params._fields_]
    program = "#include <cstdio>\n#include <cstddef>\n#include \"schedule.cuh\"\nint main() {\n" + "".join(
        f'  printf("%zu\\n", offsetof(birnn_fast::cuda::{struct}, {name}));\n' for name in fields) + \
        f'  printf("%zu\\n", sizeof(birnn_fast::cuda::{struct}));\n}}\n'
    build = pathlib.Path(__import__("tempfile").mkdtemp())
    (build / "layout.cu").write_text(program)
    subprocess.run(["nvcc", "-std=c++17", "-I", str(ROOT / "csrc" / "cuda"), "-o", str(build / "layout"),
                    str(build / "layout.cu")], check=True, capture_output=True)
    printed = [int(x) for x in subprocess.run([str(build / "layout")], capture_output=True, text=True,
                                              check=True).stdout.split()]
    expected = [getattr(params, name).offset for name in fields]
    assert printed == expected + [ctypes.sizeof(params)]


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_input_projection_layout(cell):
    """The launcher's (T, B, 2, H, X) projection at the offsets the schedule reads (xg_offset); the
    GRU's n gate without b_hn."""
    T, B, I, H = 3, 5, 6, 24
    G = schedule.cell_of(cell).gates
    input, weights, h0, c0, lengths = lstm_layer(T, B, I, H, [T] * B, seed=1, cell=cell)
    xg = cuda_kernels.input_projection(input, weights, G, H).reshape(-1)
    p = schedule.plan(cell, H, B, "bf16")
    for d in range(2):
        bias = weights[4 * d + 2] + weights[4 * d + 3]
        if cell == "GRU":
            bias[2 * H:] = weights[4 * d + 2][2 * H:]
        expected = input @ weights[4 * d].T + bias  # [T, B, G*H]
        t, b, unit, gate = np.meshgrid(np.arange(T), np.arange(B), np.arange(H), np.arange(G), indexing="ij")
        offsets = schedule.xg_offset(p, (t * B + b) * 2 + d, unit, G) + gate
        torch.testing.assert_close(xg[torch.from_numpy(offsets)], expected[t, b, gate * H + unit], rtol=1e-12,
                                   atol=1e-12)
    if G == 3:
        assert (xg.view(T, B, 2, H, 4)[..., 3] == 0).all()


@pytest.mark.parametrize("H, B", [(40, 3), (256, 17), (512, 64), (300, 130)])
def test_launch_config_follows_the_plan(H, B):
    pytest.importorskip("cuda.bindings")
    p = schedule.plan("LSTM", H, B, "bf16")
    config = cuda_kernels.launch_config(p, stream=0)
    assert (config.gridDimX, config.gridDimY, config.gridDimZ) == (p.cluster, 2, -(-B // 64))
    assert (config.blockDimX, config.sharedMemBytes, config.numAttrs) == (p.threads, p.smem_bytes, 1)
    assert config.attrs[0].value.clusterDim.x == p.cluster and config.gridDimX % p.cluster == 0
    params = cuda_kernels.forward_params(p, 7, dict(xg=1, w_hh=2, b_hh=9, h0=3, c0=4, lengths=5, output=6, h_n=7,
                                                    c_n=8, workspace=0))
    assert (params.T, params.B, params.H, params.units, params.n_tiles) == (7, B, H, p.units, p.n_tiles)


@pytest.mark.parametrize("cell, T, B, H, exchange", [
    ("LSTM", 5, 3, 40, "cluster"), ("LSTM", 4, 9, 24, "cluster"), ("GRU", 5, 3, 40, "cluster"),
    ("RNN_RELU", 4, 9, 24, "cluster"), ("LSTM", 4, 9, 40, "l2"), ("GRU", 3, 5, 33, "l2"), ("RNN_TANH", 4, 3, 24, "l2")])
def test_triton_backward_reads_the_workspace(cell, T, B, H, exchange):
    """The model's forward (the CUDA schedule, either exchange) and its workspace, then the Triton
    backward (the cuda backend's, interpreted here; the only backward where the l2 forward runs) on
    them: every gradient as the reference's, in float32."""
    kernels = interpreted_triton(torch.float32)
    lengths = mixed_lengths(T, B, seed=B)
    input, weights, h0, c0, lengths = lstm_layer(T, B, 5, H, lengths, seed=7, cell=cell)
    input, h0, c0 = (x.float() for x in (input, h0, c0))
    weights = [w.float() for w in weights]
    output, h_n, c_n, workspace = (torch.from_numpy(x) for x in
                                   schedule.run_forward(cell, input, weights, h0, c0, lengths, exchange=exchange))
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(x.shape, generator=generator) for x in (output, h_n, c_n)]
    got = kernels.ops.backward_op(cell, *grads, input, weights, h0, c0, lengths, output, workspace)
    want = reference.backward_op(cell, *grads, input, weights, h0, c0, lengths, output, workspace)
    for name, a, b in zip(("grad_input", "grad_weights", "grad_h0", "grad_c0"), got, want):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=name)


def test_device_check_self_test():
    """benchmarks/gpu/cuda_check.py --self-test, in process: every case's launch is consistent."""
    from benchmarks.gpu import cuda_check

    out = []
    assert cuda_check.self_test(out)
    assert "birnn_forward_lstm_bf16_s2_r8" in out[0]


MIRROR_PLANS = [(40, 3), (72, 64), (256, 17), (384, 40), (512, 64), (200, 130), (8, 1)]


def mirror_calls(p, first):
    """(C++ call, Python value) of every index function of schedule.cuh over ranges of its arguments
    for plan p ("P" names the C++ ForwardParams); those independent of the plan if ``first``."""
    S, G = p.split_k, 2  # m_tiles of the LSTM
    calls = [(f"unit_of(P, {r}, {w}, {g})", schedule.unit_of(p, r, w, g))
             for r in range(p.cluster) for w in range(p.unit_warps) for g in range(8)]
    calls += [(f"w_row({p.hidden}, {g}, {u})", schedule.w_row(p.hidden, g, u))
              for g in range(4) for u in (0, 7, p.hidden - 1)]
    calls += [(f"warp_k_tile(P, {ks}, {i})", schedule.warp_k_tile(p, ks, i))
              for ks in range(S) for i in range(p.warp_k_tiles + 1)]
    calls += [(f"tile_owner<{S}>({nt})", schedule.tile_owner(p, nt)) for nt in range(8)]
    calls += [(f"partial_slot({a}, {b})", schedule.partial_slot(a, b)) for a in range(S) for b in range(S) if a != b]
    calls += [(f"partial_index<{S}, {G}>(P, {w}, {nt}, {slot}, {m})", schedule.partial_index(p, w, nt, slot, m))
              for w in range(p.unit_warps) for nt in range(p.n_tiles) for slot in range(S - 1) for m in range(G)]
    calls += [(f"wsm_index<{G}>(P, {w}, {j}, {m})", schedule.wsm_index(p, w, j, m))
              for w in range(p.unit_warps * S) for j in range(p.smem_k_tiles) for m in range(G)]
    calls += [(f"slice_of(P, {k})", schedule.h_slice(p, k)[0]) for k in range(p.slices * p.units)]
    calls += [(f"column_of(P, {k})", schedule.h_slice(p, k)[1]) for k in range(p.slices * p.units)]
    # The swizzle repeats every 8 rows.
    calls += [(f"h_offset(P, {r}, {c})", schedule.h_offset(p, r, c))
              for r in sorted({*range(min(16, p.rows)), p.rows - 1}) for c in range(p.units)]
    calls += [(f"hbuf_offset(P, {b}, {s}, {r}, {c})", schedule.hbuf_offset(p, b, s, r, c))
              for b in range(2) for s in range(p.slices) for r in (0, p.rows - 1) for c in (0, p.units - 1)]
    calls += [(f"xg_offset(P, {base}, {u}, 4)", schedule.xg_offset(p, base, u, 4))
              for base in (0, 1, 5, 1 << 20) for u in (0, p.hidden - 1)]
    if not first:
        return calls + plan_bytes(p)
    calls += [(f"tile_gate({m}, {r})", schedule.tile_gate(m, r)) for m in range(2) for r in range(16)]
    calls += [(f"read_buffer({s})", schedule.read_buffer(s)) for s in range(12)]
    calls += [(f"phase_parity({s})", schedule.phase_parity(s)) for s in range(1, 12)]
    calls += [(f"step_time({d}, {s}, {n})", schedule.step_time(d, s, n))
              for d in range(2) for n in (1, 5) for s in range(n)]
    for name in ("a_coords", "c_coords"):
        for lane in range(32):
            for reg in range(4):
                row, col = getattr(schedule, name)(lane, reg)
                calls += [(f"{name}_row({lane}, {reg})", row), (f"{name}_col({lane}, {reg})", col)]
    for lane in range(32):
        for pair in range(4):
            row, k = schedule.ldmatrix_row(lane, pair, 3)
            calls += [(f"ldmatrix_row_row({lane}, {pair}, 3)", row), (f"ldmatrix_row_k({lane}, {pair}, 3)", k)]
    return calls + plan_bytes(p)


def plan_bytes(p):
    return [("plan.slice_bytes(2)", p.slice_bytes), ("plan.expect_bytes(2)", p.expect_bytes),
            ("plan.hbuf_bytes(2)", p.hbuf_bytes), ("plan.wsm_bytes()", p.wsm_bytes),
            ("plan.partial_bytes()", p.partial_bytes)]


FP32_MIRROR_PLANS = [(40, 3), (256, 64), (264, 64), (416, 16), (8, 1)]
BACKWARD_MIRROR_PLANS = [("LSTM", 40, 3, "bf16"), ("LSTM", 256, 64, "bf16"), ("LSTM", 512, 64, "bf16"),
                         ("GRU", 384, 17, "bf16"), ("GRU", 72, 70, "bf16"), ("RNN_TANH", 512, 5, "bf16"),
                         ("LSTM", 300, 33, "bf16"), ("LSTM", 264, 64, "fp32"), ("LSTM", 40, 3, "fp32"),
                         ("GRU", 416, 16, "fp32"), ("RNN_TANH", 336, 70, "fp32")]


def backward_mirror_calls(p):
    """(C++ call, Python value) of schedule.cuh's backward functions for backward plan p ("Q")."""
    calls = [(f"bwd_step(7, {i})", schedule.bwd_step(7, i)) for i in range(8)]
    calls += [(f"bwd_warp_m_tile({w}, {j})", schedule.bwd_warp_m_tile(p, w, j))
              for w in range(p.warps) for j in range(p.warp_m_tiles)]
    calls += [(f"bwd_fragment(Q, {j}, {kt})", schedule.bwd_fragment(p, j, kt))
              for j in range(p.warp_m_tiles) for kt in range(p.k_tiles)]
    calls += [(f"bwd_wsm_index(Q, {w}, {f})", schedule.bwd_wsm_index(p, w, f))
              for w in range(p.warps) for f in range(p.reg_fragments, p.reg_fragments + p.smem_fragments)]
    for rank in (0, p.cluster - 1):
        for kk in range(p.width):
            gate, unit = schedule.bwd_source(p, rank, kk)
            calls += [(f"source_gate(Q, {rank}, {kk})", gate), (f"source_unit(Q, {rank}, {kk})", unit)]
    for group in range(2 * p.m_tiles):
        rank, local = schedule.bwd_destination(p, group)
        calls += [(f"destination_rank(Q, {group})", rank), (f"destination_group(Q, {group})", local)]
    for w in range(p.warps):
        for o in range(2):
            group, nt = schedule.bwd_item(p, w, o)
            calls += [(f"item_group(Q, {w}, {o})", group), (f"item_nt(Q, {w}, {o})", nt)]
    calls += [(f"recv_offset(Q, {b}, {s}, {g}, {nt}, {lane})", schedule.recv_offset(p, b, s, g, nt, lane))
              for b in range(2) for s in (0, p.cluster - 1) for g in range(p.groups) for nt in range(p.n_tiles)
              for lane in (0, 31)]
    wide = schedule.DTYPE_BYTES[p.dtype] == 4
    offset = schedule.dgb_offset32 if wide else schedule.dgb_offset
    calls += [(f"{offset.__name__}(Q, {r}, {c})", offset(p, r, c))
              for r in sorted({*range(min(16, p.rows)), p.rows - 1}) for c in range(p.width)]
    calls += [(f"swizzled_offset({w}, {r}, {c})", schedule.swizzled_offset(w, r, c))
              for w in (8, 24, 48, 96, 128, 256) for r in range(9) for c in range(0, w, 5)]
    calls += [(f"previous_time({d}, {s}, 6)", schedule.previous_time(d, s, 6)) for d in range(2) for s in range(1, 6)]
    calls += [("bplan.slot_bytes()", p.slot_bytes), ("bplan.recv_bytes()", p.recv_bytes),
              ("bplan.dgb_bytes(2)", p.dgb_bytes), ("bplan.wsm_bytes()", p.wsm_bytes),
              ("bplan.expect_bytes()", p.expect_bytes), ("bplan.items()", p.items),
              ("bplan.width_of(4)" if wide else "bplan.width()", p.width), ("bplan.width_of(2)", 16 * p.k_tiles)]
    return calls


L2_MIRROR_PLANS = [("LSTM", 1024, 64, "bf16"), ("GRU", 40, 13, "bf16"), ("LSTM", 512, 70, "fp32"),
                   ("RNN_TANH", 777, 3, "fp16")]


def l2_mirror_calls(p):
    """(C++ call, Python value) of schedule.cuh's l2 exchange functions for l2 plan p ("P")."""
    rows, keys = p.word_rows, []
    for parity, direction, chunk in itertools.product(range(2), range(2), range(p.chunks)):
        for slice_ in sorted({0, 1, p.cluster - 1}):
            keys += [(parity, direction, chunk, slice_, r, c) for r in sorted({0, 1, rows - 1})
                     for c in sorted({0, 7, p.units - 1})]
    calls = [(f"exchange_word(P, {rows}, {p.chunks}, {', '.join(map(str, key))})",
              schedule.exchange_word(p, rows, p.chunks, *key)) for key in keys]
    for rank in sorted({0, 1, p.cluster - 1}):
        for w in sorted({0, 1, p.units, rows * p.units - 1, rows * p.units, (p.cluster - 1) * rows * p.units - 1}):
            for name, value in zip(("slice", "row", "column"), schedule.staged_word(p, rows, rank, w)):
                calls.append((f"staged_{name}(P, {rows}, {rank}, {w})", value))
    calls += [(f"partial_slice({q}, {r})", schedule.partial_slice(q, r)) for q in (1, 8, 24) for r in range(0, 64, 3)]
    calls += [(f"word_tag({s})", schedule.word_tag(s)) for s in (0, 1, 5, 1 << 20)]
    return calls


def test_schedule_cuh_mirrors_the_python():
    """schedule.cuh's functions, compiled for the host by nvcc, equal cuda_schedule's on every plan."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    helpers = """
using namespace birnn_fast::cuda;
static int slice_of(const ForwardParams& p, int k) { int s, c; h_slice(p, k, s, c); return s; }
static int column_of(const ForwardParams& p, int k) { int s, c; h_slice(p, k, s, c); return c; }
#define PAIR(NAME, FN, ...) \\
  static int NAME##_row(__VA_ARGS__) { int a, b; FN; return a; } \\
  static int NAME##_col(__VA_ARGS__) { int a, b; FN; return b; }
PAIR(a_coords, a_coords(lane, reg, a, b), int lane, int reg)
PAIR(c_coords, c_coords(lane, reg, a, b), int lane, int reg)
static int source_gate(const BackwardParams& p, int rank, int kk) { int g, u; bwd_source(p, rank, kk, g, u); return g; }
static int source_unit(const BackwardParams& p, int rank, int kk) { int g, u; bwd_source(p, rank, kk, g, u); return u; }
static int destination_rank(const BackwardParams& p, int group) { int r, l; bwd_destination(p, group, r, l); return r; }
static int destination_group(const BackwardParams& p, int group) { int r, l; bwd_destination(p, group, r, l); return l; }
static int item_group(const BackwardParams& p, int warp, int o) { int g, n; bwd_item(p, warp, o, g, n); return g; }
static int item_nt(const BackwardParams& p, int warp, int o) { int g, n; bwd_item(p, warp, o, g, n); return n; }
static int ldmatrix_row_row(int lane, int pair, int kt) { int a, b; ldmatrix_row(lane, pair, kt, a, b); return a; }
static int ldmatrix_row_k(int lane, int pair, int kt) { int a, b; ldmatrix_row(lane, pair, kt, a, b); return b; }
static int staged_slice(const ForwardParams& p, int r, int k, int w) { int s, q, c; staged_word(p, r, k, w, s, q, c); return s; }
static int staged_row(const ForwardParams& p, int r, int k, int w) { int s, q, c; staged_word(p, r, k, w, s, q, c); return q; }
static int staged_column(const ForwardParams& p, int r, int k, int w) { int s, q, c; staged_word(p, r, k, w, s, q, c); return c; }
"""
    body, expected = [], []

    def block(header, calls):
        """A C++ block of the plan's header, printing each call; expected gets the Python values."""
        body.append("{\n" + header + "".join(f'  printf("%lld\\n", (long long)({call}));\n' for call, _ in calls)
                    + "}\n")
        expected.extend(int(value) for _, value in calls)

    def forward_header(p):
        return "  ForwardParams P{};\n" + "".join(
            f"  P.{field} = {getattr(p, attribute)};\n" for field, attribute in (
                ("B", "batch"), ("H", "hidden"), ("units", "units"), ("cluster", "cluster"), ("slices", "slices"),
                ("unit_warps", "unit_warps"), ("k_tiles", "k_tiles"), ("warp_k_tiles", "warp_k_tiles"),
                ("smem_k_tiles", "smem_k_tiles"), ("n_tiles", "n_tiles"))) + \
            f"  const Plan plan{{P, {p.split_k}, 4}};\n"

    for index, (H, B) in enumerate(MIRROR_PLANS):
        p = schedule.plan("LSTM", H, B, "bf16")
        block(forward_header(p), list(mirror_calls(p, first=index == 0)))
    for H, B in FP32_MIRROR_PLANS:
        p = schedule.plan("LSTM", H, B, "fp32")
        calls = [(f"hbuf_offset32(P, {b}, {s}, {r}, {c})", schedule.hbuf_offset32(p, b, s, r, c))
                 for b in range(2) for s in range(p.slices) for r in sorted({*range(9), p.rows - 1})
                 for c in range(p.units)]
        calls += [("plan.slice_bytes(4)", p.slice_bytes), ("plan.expect_bytes(4)", p.expect_bytes),
                  ("plan.hbuf_bytes(4)", p.hbuf_bytes), ("plan.wsm_bytes()", p.wsm_bytes),
                  ("plan.partial_bytes()", p.partial_bytes)]
        block(forward_header(p), calls)
    for cell, H, B, dtype in L2_MIRROR_PLANS:
        p = schedule.l2_plan(cell, H, B, dtype, fit=False)
        block(forward_header(p), list(l2_mirror_calls(p)))
    for cell, H, B, dtype in BACKWARD_MIRROR_PLANS:
        p = schedule.backward_plan(cell, H, B, dtype)
        block("  BackwardParams Q{};\n" + "".join(
            f"  Q.{field} = {getattr(p, field)};\n" for field in (
                "gates", "units", "cluster", "chunk_rows", "n_tiles", "m_tiles", "warp_m_tiles", "k_tiles",
                "fragment_stride", "reg_fragments", "smem_fragments")) +
            f"  Q.B = {B};\n  Q.H = {H};\n  const BackwardPlan bplan{{Q}};\n", list(backward_mirror_calls(p)))
    program = ("#include <cstdio>\n#include \"schedule.cuh\"\n" + helpers + "int main() {\n" + "".join(body) + "}\n")
    build = pathlib.Path(__import__("tempfile").mkdtemp())
    (build / "mirror.cu").write_text(program)
    subprocess.run(["nvcc", "-std=c++17", "-I", str(ROOT / "csrc" / "cuda"), "-o", str(build / "mirror"),
                    str(build / "mirror.cu")], check=True, capture_output=True)
    printed = [int(x) for x in subprocess.run([str(build / "mirror")], capture_output=True, text=True,
                                              check=True).stdout.split()]
    assert len(printed) == len(expected)
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(printed, expected)) if a != b]
    assert not mismatches, mismatches[:10]


class FakeDriver:
    """cuda.bindings.driver as far as the launcher uses it, recording the calls (no GPU here)."""

    class CUresult:
        CUDA_SUCCESS = 0

    def __init__(self, real, params_type=cuda_kernels.ForwardParams):
        self.real, self.calls, self.params_type, self.on_launch = real, [], params_type, None
        self.CUfunction_attribute = real.CUfunction_attribute
        self.CUlaunchConfig, self.CUlaunchAttribute = real.CUlaunchConfig, real.CUlaunchAttribute
        self.CUlaunchAttributeID, self.CUstream = real.CUlaunchAttributeID, real.CUstream

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            if name == "cuCtxGetCurrent":
                return 0, 1
            if name == "cuModuleLoadData":
                image = ctypes.string_at(args[0], 4)
                assert image == b"\x7fELF", image
                return 0, "module"
            if name == "cuModuleGetFunction":
                return 0, f"function {args[1].decode()}"
            if name == "cuLaunchKernelEx":
                pointer = ctypes.cast(args[2], ctypes.POINTER(ctypes.c_void_p))[0]
                self.params = self.params_type.from_buffer_copy(ctypes.string_at(pointer, ctypes.sizeof(
                    self.params_type)))
                if self.on_launch is not None:
                    self.on_launch(self.params)
            return (0,)
        return call


@pytest.mark.parametrize("cell, dtype, precision", [
    ("LSTM", torch.bfloat16, None), ("GRU", torch.bfloat16, None), ("RNN_RELU", torch.bfloat16, None),
    ("LSTM", torch.float32, "tf32"), ("LSTM", torch.float32, "ieee"), ("GRU", torch.float32, "ieee")])
def test_forward_launch_without_a_gpu(monkeypatch, tmp_path, cell, dtype, precision):
    """forward_op's host path end to end with the driver and torch.cuda stood in for: the cubin it
    loads, the attributes it sets, the configuration and the argument it launches with; float32's
    kernel by cuDNN's RNN rule (TF32, else 3xTF32), from the fp32 cubin."""
    bindings = pytest.importorskip("cuda.bindings.driver")
    fake = FakeDriver(bindings)
    name = {torch.bfloat16: "bf16", "tf32": "tf32", "ieee": "fp32"}[precision or dtype]
    if precision is not None:
        monkeypatch.setattr(cuda_kernels._fp32_rule, "fp32_precision", lambda: precision)
    stand_in_for_a_gpu(monkeypatch, tmp_path, fake, schedule.cubin_name(cell, name))
    T, B, H = 6, 70, 40
    input, weights, h0, c0, lengths = lstm_layer(T, B, 5, H, mixed_lengths(T, B, 2), seed=2, cell=cell)
    input, h0, c0 = (x.to(dtype) for x in (input, h0, c0))
    weights = [w.to(dtype) for w in weights]
    output, h_n, c_n, workspace = cuda_kernels.forward_op(cell, input, weights, h0, c0, lengths, True)
    p = schedule.plan(cell, H, B, name)
    assert p.kernel.split("_")[3] == name and output.dtype == dtype
    names = [name for name, _ in fake.calls]
    assert names[:2] == ["cuCtxGetCurrent", "cuModuleLoadData"] and names[-1] == "cuLaunchKernelEx"
    attributes = {args[1]: args[2] for name, args in fake.calls if name == "cuFuncSetAttribute"}
    assert attributes[bindings.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES] >= p.smem_bytes
    assert attributes[bindings.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED] == 1
    config, function = fake.calls[-1][1][:2]
    assert function == f"function {p.kernel}"
    assert (config.gridDimX, config.gridDimY, config.gridDimZ, config.blockDimX) == (*p.grid, p.threads)
    assert config.sharedMemBytes == p.smem_bytes and int(config.hStream) == 77
    params = fake.params
    assert (params.output, params.h_n, params.workspace or 0) == (output.data_ptr(), h_n.data_ptr(),
                                                                  workspace.data_ptr())
    assert (params.T, params.B, params.H, params.cluster, params.relu) == (T, B, H, p.cluster, int(cell == "RNN_RELU"))
    assert workspace.shape == (T, B, 2, schedule.cell_of(cell).saved * H) and c_n.shape == c0.shape


def stand_in_for_a_gpu(monkeypatch, tmp_path, fake, cubin, capability=(9, 0)):
    monkeypatch.setattr(cuda_kernels, "driver", fake)
    monkeypatch.setattr(cuda_kernels, "_IMPORT_ERROR", None)
    monkeypatch.setattr(cuda_kernels, "_modules", {})
    monkeypatch.setattr(cuda_kernels, "CUBIN_DIR", tmp_path)
    arch = cuda_kernels.ARCHS[capability]
    (tmp_path / f"{cubin}.sm_{arch}.cubin").write_bytes(b"\x7fELF fake")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type(
        "P", (), {"multi_processor_count": schedule.L2_ARCHS[arch][0]})())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 77})())
    monkeypatch.setattr(cuda_kernels, "why_not", lambda *args: None)  # a CPU tensor stands for a CUDA one


@pytest.mark.parametrize("cell, H, B, dtype, precision", [
    ("LSTM", 40, 70, torch.bfloat16, None), ("GRU", 512, 64, torch.bfloat16, None),
    ("RNN_RELU", 72, 3, torch.bfloat16, None), ("LSTM", 264, 64, torch.float32, "tf32"),
    ("GRU", 40, 70, torch.float32, "ieee"), ("RNN_RELU", 72, 3, torch.float32, "ieee")])
def test_backward_launch_without_a_gpu(monkeypatch, tmp_path, cell, H, B, dtype, precision):
    """backward_op's host path with the driver and torch.cuda stood in for: the backward cubin, the
    plan's configuration, the argument's pointers and plan fields, and the gradients' shapes;
    float32's kernel by cuDNN's RNN rule (TF32, else 3xTF32), from the fp32 cubin."""
    bindings = pytest.importorskip("cuda.bindings.driver")
    fake = FakeDriver(bindings, cuda_kernels.BackwardParams)
    name = {torch.bfloat16: "bf16", "tf32": "tf32", "ieee": "fp32"}[precision or dtype]
    if precision is not None:
        monkeypatch.setattr(cuda_kernels._fp32_rule, "fp32_precision", lambda: precision)
    stand_in_for_a_gpu(monkeypatch, tmp_path, fake, schedule.backward_cubin_name(cell, name))
    T = 6
    input, weights, h0, c0, lengths = lstm_layer(T, B, 5, H, mixed_lengths(T, B, 2), seed=2, cell=cell)
    input, h0, c0 = (x.to(dtype) for x in (input, h0, c0))
    weights = [w.to(dtype) for w in weights]
    saved = schedule.cell_of(cell).saved
    output, workspace = torch.zeros(T, B, 2 * H, dtype=dtype), torch.zeros(T, B, 2, saved * H)
    grads = (torch.zeros_like(output), torch.zeros_like(h0), torch.zeros_like(c0))
    grad_input, grad_weights, grad_h0, grad_c0 = cuda_kernels.backward_op(cell, *grads, input, weights, h0, c0,
                                                                          lengths, output, workspace)
    p = schedule.backward_plan(cell, H, B, name)
    assert p.kernel.split("_")[3] == name and grad_input.dtype == dtype
    config, function = fake.calls[-1][1][:2]
    assert fake.calls[-1][0] == "cuLaunchKernelEx" and function == f"function {p.kernel}"
    assert (config.gridDimX, config.gridDimY, config.gridDimZ, config.blockDimX) == (*p.grid, p.threads)
    assert config.sharedMemBytes == p.smem_bytes and config.attrs[0].value.clusterDim.x == p.cluster
    params = fake.params
    assert (params.grad_h0, params.grad_c0 or 0) == (grad_h0.data_ptr(), grad_c0.data_ptr())
    assert (params.workspace or 0) == workspace.data_ptr() and params.lengths == lengths.data_ptr()
    for field, _ in cuda_kernels.BackwardParams._fields_[12:]:
        want = {"T": T, "B": B, "H": H, "relu": int(cell == "RNN_RELU")}.get(field)
        assert getattr(params, field) == (want if want is not None else getattr(p, field)), field
    assert grad_input.shape == input.shape and [g.shape for g in grad_weights] == [w.shape for w in weights]
    assert grad_h0.shape == h0.shape and grad_c0.shape == c0.shape


def test_backward_falls_back_to_triton(monkeypatch):
    """Where the CUDA backward cannot run (here: no GPU; a workspace not the forward's), the Triton
    kernels' backward gets the call unchanged."""
    calls = []
    monkeypatch.setattr(cuda_kernels, "_triton_ops", type("Ops", (), {"backward_op": staticmethod(
        lambda *args: calls.append(args) or "triton")}))
    T, B, H = 3, 2, 8
    input, weights, h0, c0, lengths = lstm_layer(T, B, 5, H, [T] * B, seed=1)
    output, workspace = torch.zeros(T, B, 2 * H), torch.zeros(T, B, 2, 5 * H)
    grads = (torch.zeros_like(output), torch.zeros_like(h0), torch.zeros_like(c0))
    arguments = ("LSTM", *grads, input, weights, h0, c0, lengths, output, workspace)
    assert cuda_kernels.backward_op(*arguments) == "triton" and len(calls[0]) == len(arguments) + 1
    assert "CUDA tensors" in cuda_kernels._backward_reason("LSTM", input, weights, workspace, grads)
    monkeypatch.setattr(cuda_kernels, "why_not", lambda *args: None)
    bad = torch.zeros(T, B, 2, 4 * H)
    assert "workspace" in cuda_kernels._backward_reason("LSTM", input, weights, bad, grads)
    monkeypatch.setattr(cuda_kernels, "_triton_ops", None)
    with pytest.raises(RuntimeError, match="Triton kernels it would fall back to"):
        cuda_kernels.backward_op("LSTM", *grads, input, weights, h0, c0, lengths, output, bad)


@pytest.mark.parametrize("cell, H, B, dtype, precision, capability", [
    ("LSTM", 1024, 64, torch.bfloat16, None, (9, 0)), ("GRU", 40, 70, torch.bfloat16, None, (8, 0)),
    ("RNN_RELU", 520, 3, torch.float16, None, (8, 0)), ("LSTM", 512, 64, torch.float32, "ieee", (9, 0)),
    ("GRU", 440, 17, torch.float32, "tf32", (9, 0))])
def test_l2_launch_without_a_gpu(monkeypatch, tmp_path, cell, H, B, dtype, precision, capability):
    """forward_op's host path where the l2 exchange runs (past one cluster on sm_90, every layer on
    sm_80), the driver and torch.cuda stood in for: the l2 cubin and kernel, a cooperative launch
    without clusters, the shared-memory limit of the architecture, the argument (L2Params: the
    forward's fields, the words filled with tag -1, the status word, the plan's exchange fields) and
    the RuntimeError naming kernel and plan when the status word says a poll gave up."""
    bindings = pytest.importorskip("cuda.bindings.driver")
    fake = FakeDriver(bindings, cuda_kernels.L2Params)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", "tf32": "tf32", "ieee": "fp32"}[precision or dtype]
    if precision is not None:
        monkeypatch.setattr(cuda_kernels._fp32_rule, "fp32_precision", lambda: precision)
    arch = cuda_kernels.ARCHS[capability]
    stand_in_for_a_gpu(monkeypatch, tmp_path, fake, schedule.cubin_name(cell, name, "l2"), capability)
    T = 3
    input, weights, h0, c0, lengths = lstm_layer(T, B, 5, H, mixed_lengths(T, B, 2), seed=2, cell=cell)
    input, h0, c0 = (x.to(dtype) for x in (input, h0, c0))
    weights = [w.to(dtype) for w in weights]
    sms, limit = schedule.L2_ARCHS[arch]
    p = schedule.l2_plan(cell, H, B, name, sms, limit)
    words = []
    fake.on_launch = lambda params: words.append(ctypes.string_at(params.words, 8 * p.exchange_words))
    output, h_n, c_n, workspace = cuda_kernels.forward_op(cell, input, weights, h0, c0, lengths, True)
    attributes = {args[1]: args[2] for name_, args in fake.calls if name_ == "cuFuncSetAttribute"}
    assert attributes == {bindings.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: limit}
    config, function = fake.calls[-1][1][:2]
    assert function == f"function {p.kernel}" and "_l2_" in p.kernel
    assert (config.gridDimX, config.gridDimY, config.gridDimZ, config.blockDimX) == (*p.grid, p.threads)
    assert config.sharedMemBytes == p.smem_bytes <= limit and config.numAttrs == 1
    assert config.attrs[0].id == bindings.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
    assert config.attrs[0].value.cooperative == 1
    params = fake.params
    assert (params.p.output, params.p.h_n) == (output.data_ptr(), h_n.data_ptr())
    assert (params.p.T, params.p.B, params.p.H, params.p.units, params.p.cluster) == (T, B, H, p.units, p.cluster)
    assert (params.chunks, params.word_rows, params.partial_slices) == (p.chunks, p.word_rows, p.partial_slices)
    assert params.max_polls == cuda_kernels.max_polls() > 0 and params.status
    assert words[0] == b"\xff" * (8 * p.exchange_words), "every word tag -1 before the launch"
    # A poll that gave up: the kernel's plain store of 1 into the status word.
    fake.on_launch = lambda params: ctypes.c_int32.from_address(params.status).__setattr__("value", 1)
    with pytest.raises(RuntimeError, match=f"{p.kernel} with .*not resident at once"):
        cuda_kernels.forward_op(cell, input, weights, h0, c0, lengths, True)


def test_backward_on_sm80_is_tritons(monkeypatch):
    """sm_80 has no clusters: why_not refuses the CUDA backward there (backward_op then runs the
    Triton backward on the l2 forward's workspace), not the forward."""
    monkeypatch.setattr(cuda_kernels, "_IMPORT_ERROR", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("P", (), {"multi_processor_count": 108})())
    monkeypatch.setattr(cuda_kernels, "CUBIN_DIR", pathlib.Path("/nonexistent"))
    assert "needs thread-block clusters" in cuda_kernels.why_not("cuda", torch.bfloat16, "LSTM", 40, 3, backward=True)
    assert "forward_lstm_l2.sm_80.cubin is missing" in cuda_kernels.why_not("cuda", torch.bfloat16, "LSTM", 40, 3)
    assert "on this device" in cuda_kernels.why_not("cuda", torch.bfloat16, "LSTM", 1024, 64)
