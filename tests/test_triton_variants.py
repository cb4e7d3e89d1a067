"""The kernels' variants (kernels/forward.py and backward.py VARIANTS: cheap changes to a step, off by
default, launch options the device check A/Bs): each computes what the default does, every cell, lengths
from 1 to T, through the interpreter on a grid of several programs meeting at the barrier; and each
compiles for sm_90 without spills (offline, in a child process). The step-tagged exchange
(tagged_exchange) of the forward and of the backward in every form of the products and word size, its
bounded poll, and its sm_90 SASS: no fence, no atomic."""
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from birnn_fast.kernels import backward as kernels_backward  # noqa: E402
from birnn_fast.kernels import config as kernels_config  # noqa: E402
from birnn_fast.kernels.common import PAD_TAG  # noqa: E402
from birnn_fast.kernels import forward as kernels_forward  # noqa: E402
from concurrent_interpreter import concurrent_programs  # noqa: E402
from test_kernels_triton import INTERPRETED, SHARED_LIMIT, make_grads, make_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", sorted(kernels_forward.VARIANTS))
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_variant_as_default(cell, variant):
    if INTERPRETED and variant in kernels_forward.COMPILED_ONLY:
        pytest.skip(f"{variant} runs compiled only (the device check compares it with the default)")
    T, B, H, lengths = 4, 5, 40, [4, 1, 3, 2, 4]
    args = make_inputs(cell, T, B, 3, H, lengths)
    config = None
    context = concurrent_programs
    if INTERPRETED:
        # Three programs per direction meeting at the barrier, as on a GPU.
        config = kernels_config.select_config(cell, B, H, torch.float32, "ieee", 6, SHARED_LIMIT[90], False,
                                              stream_tiles=())
    with context():
        expected = kernels_forward.forward(cell, *args.values(), config=config)
    with context():
        actual = kernels_forward.forward(cell, *args.values(), config=config, variants=(variant,))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def grid_config(cell, B, H, dtype, streamed=False, fused=False, backward=False):
    """select_config's resident grid for a 6-SM GPU (3 programs per direction meet at the barrier, or
    poll each other's tags), or its streamed twin (K chunks of 16, FUSED as given: the double buffer)."""
    config = kernels_config.select_config(cell, B, H, dtype, "ieee", 6, SHARED_LIMIT[90], backward, stream_tiles=())
    assert config.n_hblocks == 3, config
    if streamed:
        config = config._replace(RESIDENT=False, NK=1, BK=16, FUSED=fused and not backward)
    return config


# (cell, dtype, B, lengths, streamed, fused): bf16 (int32 words), streamed per gate and fused (its
# double-buffered K loop), and B = 33 (three batch blocks, one program along batch: three rounds a step;
# the last block's one row ends after 2 of the 4 steps: the forward drops the block from step 2 on, the
# backward takes it up at step 1, its first read of a slot no step wrote before).
TAGGED_CASES = [("LSTM", torch.bfloat16, 5, [4, 1, 3, 2, 4], False, False),
                ("GRU", torch.float16, 5, [4, 1, 3, 2, 4], False, False),
                ("LSTM", torch.float32, 5, [4, 1, 3, 2, 4], True, False),
                ("LSTM", torch.float32, 5, [4, 1, 3, 2, 4], True, True),
                ("GRU", torch.bfloat16, 5, [4, 1, 3, 2, 4], True, True),
                ("RNN_RELU", torch.float32, 33, [4, 1, 3, 2] * 8 + [2], False, False)]


TAGGED_IDS = ["lstm-bf16", "gru-fp16", "lstm-streamed", "lstm-streamed-fused", "gru-bf16-streamed-fused",
              "relu-three-rounds"]


@pytest.mark.parametrize("cell,dtype,B,lengths,streamed,fused", TAGGED_CASES, ids=TAGGED_IDS)
def test_tagged_exchange_as_default(cell, dtype, B, lengths, streamed, fused):
    """The step-tagged exchange computes what the barrier does, bit for bit, in each form of the
    products and word size."""
    T, H = 4, 40
    args = make_inputs(cell, T, B, 3, H, lengths, dtype=dtype)
    config = grid_config(cell, B, H, dtype, streamed, fused)
    with concurrent_programs():
        expected = kernels_forward.forward(cell, *args.values(), config=config)
    with concurrent_programs():
        actual = kernels_forward.forward(cell, *args.values(), config=config, variants=("tagged_exchange",))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def backward_of(cell, args, output, workspace, grads, config, variants=(), max_polls=None):
    """kernels_backward.backward of a forward's output and workspace."""
    return kernels_backward.backward(cell, *grads, args["input"], args["weight_ih"], args["weight_hh"], args["bias_hh"],
                                     args["h0"], args["c0"], args["lengths"], output, workspace, config=config,
                                     max_polls=max_polls, variants=variants)


@pytest.mark.parametrize("cell,dtype,B,lengths,streamed,fused", TAGGED_CASES, ids=TAGGED_IDS)
def test_tagged_exchange_backward_as_default(monkeypatch, cell, dtype, B, lengths, streamed, fused):
    """The backward's step-tagged exchange of the gate gradients computes what its barrier does, bit
    for bit, every gradient, in each form of the products and word size (streamed "fused": the
    backward's double-buffered K loop; not: the loop Triton before 3.9 builds). The forward runs
    on the interpreter's own grid: only its results matter here."""
    T, H = 4, 40
    args = make_inputs(cell, T, B, 3, H, lengths, dtype=dtype)
    output, _, _, workspace = kernels_forward.forward(cell, *args.values())
    grads = make_grads(cell, T, B, H, dtype=dtype)
    config = grid_config(cell, B, H, dtype, streamed, backward=True)
    if streamed:
        monkeypatch.setattr(kernels_config, "double_buffered_backward", lambda: fused)
    with concurrent_programs():
        expected = backward_of(cell, args, output, workspace, grads, config)
    with concurrent_programs():
        actual = backward_of(cell, args, output, workspace, grads, config, variants=("tagged_exchange",))
    assert len(actual) == len(expected) == 7
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter reads the kernel's globals at each launch")
@pytest.mark.parametrize("cell,dtype", [("LSTM", torch.bfloat16), ("GRU", torch.float32)])
def test_tagged_exchange_backward_one_gate_at_a_time(monkeypatch, cell, dtype):
    """The resident products past EARLY_READ_MAX_K (K = 1024 with Triton before 3.9, too large to
    interpret), each gate's words read after the previous gate's product: bit for bit as the barrier
    build."""
    T, B, H, lengths = 4, 5, 40, [4, 1, 3, 2, 4]
    args = make_inputs(cell, T, B, 3, H, lengths, dtype=dtype)
    output, _, _, workspace = kernels_forward.forward(cell, *args.values())
    grads = make_grads(cell, T, B, H, dtype=dtype)
    config = grid_config(cell, B, H, dtype, backward=True)
    assert config.RESIDENT and config.NK * config.BK <= kernels_backward.EARLY_READ_MAX_K.value
    with concurrent_programs():
        expected = backward_of(cell, args, output, workspace, grads, config)
    monkeypatch.setattr(kernels_backward, "EARLY_READ_MAX_K", tl.constexpr(0))
    with concurrent_programs():
        actual = backward_of(cell, args, output, workspace, grads, config, variants=("tagged_exchange",))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not INTERPRETED, reason="a grid one program short is staged by the interpreter")
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_tagged_exchange_one_program_short_raises(kernel):
    """The last program starts only once the others have finished: their polls of its tags give up
    after max_polls, the launch ends, and the launcher raises (as tests/test_triton_safety.py's barrier),
    naming what the programs waited for."""
    T, B, H, lengths = 3, 4, 40, [3, 1, 2, 3]
    args = make_inputs("LSTM", T, B, 3, H, lengths)
    match = f"birnn_{kernel}_kernel with Config.*waited for the step-tagged exchange words"
    if kernel == "forward":
        with concurrent_programs(held_back=1), pytest.raises(RuntimeError, match=match):
            kernels_forward.forward("LSTM", *args.values(), config=grid_config("LSTM", B, H, torch.float32),
                                    max_polls=200, variants=("tagged_exchange",))
        return
    output, _, _, workspace = kernels_forward.forward("LSTM", *args.values())
    grads = make_grads("LSTM", T, B, H)
    config = grid_config("LSTM", B, H, torch.float32, backward=True)
    with concurrent_programs(held_back=1), pytest.raises(RuntimeError, match=match):
        backward_of("LSTM", args, output, workspace, grads, config, ("tagged_exchange",), max_polls=200)


def test_tagged_gate_buffer():
    """Every word's tag -1 (never awaited), whatever step a slot's first reader comes at; resident,
    each gate's words padded to the product's K span with PAD_TAG words of value 0; fp32 gate
    gradients in int64 words, 16-bit in int32."""
    streamed = kernels_config.Config(16, 16, 1, 16, False, n_hblocks=3, n_bprog=1)
    resident = streamed._replace(NK=4, BK=16, RESIDENT=True)
    for dtype, word, bits in ((torch.float32, torch.int64, 32), (torch.bfloat16, torch.int32, 16),
                              (torch.float16, torch.int32, 16)):
        words = kernels_backward.tagged_gate_buffer(3, 4, 40, dtype, streamed, torch.device("cpu"))
        assert words.dtype == word and words.shape == (2, 2, 3, 160)
        assert (words >> bits == -1).all()
        words = kernels_backward.tagged_gate_buffer(3, 4, 40, dtype, resident, torch.device("cpu")).view(2, 2, 3, 4, 64)
        assert words.dtype == word
        assert (words[..., :40] >> bits == -1).all()
        assert (words[..., 40:] >> bits == PAD_TAG.value).all() and (words[..., 40:] & ((1 << bits) - 1) == 0).all()


def test_tagged_exchange_buffer():
    """h0 in slot 0 with tag 0 (the values' bits in the low half), slot 1 zeros; resident, each row of
    both slots padded to the product's K span, and the rows to the batch blocks' (B = 3 -> BB = 4 rows,
    B = 5 -> 8), with PAD_TAG words of value 0; fp32 in int64 words, 16-bit values in int32."""
    streamed = kernels_config.Config(4, 16, 1, 16, False, n_hblocks=3, n_bprog=1)
    resident = streamed._replace(NK=2, BK=4, RESIDENT=True)
    for B, rows in ((3, 4), (5, 8)):
        h0 = torch.randn(2, B, 3)
        h0[0, 0, :2] = torch.tensor([0.0, -0.0])
        for config, shape in ((streamed, (B, 3)), (resident, (rows, 8))):
            for x, view, bits in ((h0, torch.float32, 32), (h0.bfloat16(), torch.bfloat16, 16),
                                  (h0.half(), torch.float16, 16)):
                words = kernels_forward.tagged_exchange_buffer(x, config)
                assert words.dtype == (torch.int64 if bits == 32 else torch.int32) and words.shape == (2, 2, *shape)
                values = words[:, :, :B, :3]
                assert torch.equal(values[:, 0].to(getattr(torch, f"int{bits}")).view(view), x)
                assert (values[:, 0] >> bits == 0).all() and (values[:, 1] == 0).all()
                padding = torch.ones(words.shape, dtype=torch.bool)
                padding[:, :, :B, :3] = False
                pad = words[padding]
                assert pad.numel() == words.numel() - 12 * B
                assert (pad >> bits == PAD_TAG.value).all() and (pad & ((1 << bits) - 1) == 0).all()


def test_unknown_variant():
    args = make_inputs("LSTM", 2, 2, 3, 16, [2, 1])
    with pytest.raises(ValueError, match="unknown variants"):
        kernels_forward.forward("LSTM", *args.values(), variants=("faster",))
    output, _, _, workspace = kernels_forward.forward("LSTM", *args.values())
    with pytest.raises(ValueError, match="unknown variants"):
        backward_of("LSTM", args, output, workspace, make_grads("LSTM", 2, 2, 16), None, ("red_arrive",))
    if INTERPRETED:
        with pytest.raises(ValueError, match="compiled only"):
            kernels_forward.forward("LSTM", *args.values(), variants=tuple(kernels_forward.COMPILED_ONLY))


CHILD = r"""
import json, re, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.gpu import sass
from birnn_fast.kernels import config as kernels
for kernel, variant, cell, dtype, precision, H, resident in json.loads(sys.argv[2]):
    BB, BH = kernels.RESIDENT_TILE if resident else kernels.STREAM_TILES[0]
    NK, BK = kernels.split_k(H, resident)
    compiled = sass.compile_kernel(f"birnn_{kernel}_kernel", cell, getattr(torch, dtype), precision, BB, BH, NK, BK,
                                   resident, cc=90, variants=(variant,) if variant != "default" else ())
    code = sass.cuobjdump(compiled, "--dump-sass")
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", sass.cuobjdump(compiled, "--dump-resource-usage")))
    shape = sass.round_shape(code)
    print(json.dumps(dict(shape, kernel=kernel, variant=variant, cell=cell, dtype=dtype, H=H, resident=resident,
                          spills=shape["LOOP_SPILLS"], local=int(usage["LOCAL"]), red="REDG" in code)), flush=True)
"""
VARIANTS = sorted(kernels_forward.VARIANTS) + ["default"]
# The forward: every variant resident in bf16 at H 512 (LSTM, GRU) and streamed in TF32 at H 1024; the
# tagged exchange also streamed on the FMA units (fp32, int64 words), with the GRU resident at H 256 (at
# H 512 its build spills: kernels/forward.py VARIANTS), and the LSTM resident in bf16 at H 1024 (K = 1024,
# its rows padded: the device check times it, benchmarks/gpu/phases.py), each beside its default.
TAGGED = "tagged_exchange"
BUILDS = ([("forward", variant, cell, "bfloat16", "ieee", 512, True) for variant in VARIANTS for cell in ("LSTM", "GRU")
           if (variant, cell) != (TAGGED, "GRU")]
          + [("forward", variant, "LSTM", "float32", "tf32", 1024, False) for variant in VARIANTS]
          + [("forward", variant, cell, dtype, precision, H, resident) for variant in (TAGGED, "default")
             for cell, dtype, precision, H, resident in (("GRU", "bfloat16", "ieee", 256, True),
                                                         ("LSTM", "float32", "ieee", 256, False),
                                                         ("LSTM", "bfloat16", "ieee", 1024, True))])
# The backward's tagged exchange as the device check times it (benchmarks/gpu/phases.py: the LSTM in bf16
# resident at H 512 and 1024, in TF32 streamed at H 1024), and one default build beside (its barrier's
# fences and atomics: what the check must see).
BACKWARD_BUILDS = ([("backward", TAGGED, "LSTM", "bfloat16", "ieee", H, True) for H in (512, 1024)]
                   + [("backward", TAGGED, "LSTM", "float32", "tf32", 1024, False),
                      ("backward", "default", "LSTM", "bfloat16", "ieee", 512, True)])


@pytest.fixture(scope="module")
def builds():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", CHILD, ROOT, json.dumps(BUILDS + BACKWARD_BUILDS)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == len(BUILDS) + len(BACKWARD_BUILDS)
    return records


def test_variants_compile_without_spills(builds):
    for record in builds:
        assert record["spills"] == 0 and record["local"] == 0, record
        if record["variant"] == "red_arrive":
            assert record["red"], f"red_arrive's SASS has no RED: {record}"


def test_tagged_exchange_sass(builds):
    """sm_90: the TAGGED build orders nothing GPU-wide, anywhere in the kernel (its step loop included):
    no fence, no atomic (returning or not), no L1 invalidation (the default build's barrier has each in
    its step loop: the check sees them); it polls with strong loads that stay in the poll's loop; before
    its first product it waits on at most three more round trips than the default (counted statically:
    the poll's reload, which runs only when a tag is late; streamed, the first chunk's poll), and a
    streamed K chunk on no more than the default's (the double buffer still hides the next chunk's
    read). Spill-free as every build (test_variants_compile_without_spills)."""
    forward = [r for r in builds if r["kernel"] == "forward"]
    default = {(r["cell"], r["dtype"], r["H"]): r for r in forward if r["variant"] == "default"}
    tagged = [r for r in forward if r["variant"] == TAGGED]
    assert len(tagged) == 5 and len(default) == 6
    for record in tagged:
        base = default[record["cell"], record["dtype"], record["H"]]
        assert base["LOOP_FENCES"] >= 1 and base["LOOP_RETURNING_ATOMICS"] >= 1 and base["LOOP_INVALIDATES"] >= 1, base
        for name in ("FENCES", "RETURNING_ATOMICS", "REDUCTIONS", "INVALIDATES"):
            assert record[f"LOOP_{name}"] == record[f"KERNEL_{name}"] == 0, (name, record)
        assert record["WAIT_TO_ARRIVE"] is None and record["ARRIVE_TO_WAIT"] is None, record
        # The default's exchange reads (and its counter poll, one load), twice: the first read and the poll's.
        assert record["LOOP_STRONG_LOADS"] >= 2 * (base["LOOP_STRONG_LOADS"] - 1), (record, base)
        if record["DEPENDENT_LOADS"] is not None:  # a product on the tensor cores
            assert record["DEPENDENT_LOADS"] <= base["DEPENDENT_LOADS"] + 3, (record, base)
        if not record["resident"] and base["K_CHUNK_DEPENDENT_LOADS"] is not None:
            assert record["K_CHUNK_DEPENDENT_LOADS"] <= base["K_CHUNK_DEPENDENT_LOADS"], (record, base)


def test_tagged_exchange_backward_sass(builds):
    """sm_90: the backward's TAGGED builds that the device check times order nothing GPU-wide, anywhere
    in the kernel (its step loop included): no fence, no atomic (returning or not), no L1 invalidation,
    where the default build's barrier has each; they poll with strong loads in the step loop, and
    compile without spills (test_variants_compile_without_spills)."""
    backward = [r for r in builds if r["kernel"] == "backward"]
    base = next(r for r in backward if r["variant"] == "default")
    assert base["LOOP_FENCES"] >= 1 and base["LOOP_RETURNING_ATOMICS"] >= 1 and base["LOOP_INVALIDATES"] >= 1, base
    tagged = [r for r in backward if r["variant"] == TAGGED]
    assert len(tagged) == 3
    for record in tagged:
        for name in ("FENCES", "RETURNING_ATOMICS", "REDUCTIONS", "INVALIDATES"):
            assert record[f"LOOP_{name}"] == record[f"KERNEL_{name}"] == 0, (name, record)
        assert record["LOOP_STRONG_LOADS"] > 0 and record["WAIT_TO_ARRIVE"] is None, record
