"""Differential fuzzing: FastBiLSTM / FastBiGRU / FastBiRNN against torch.nn.LSTM / GRU / RNN
(bidirectional=True, a PackedSequence for the lengths), forward (output, h_n, c_n) and every
gradient (input, h0, c0, every parameter), on random tiny layers.

Hypothesis draws T, B (0 included), I, H, layers, bias, batch_first, lengths (none, all equal,
mixed with 1 and T), how they are given (``lengths=`` or a PackedSequence), hx, proj_size and the
dtype. Derandomized, so every run of CI tries the same cases; ``BIRNN_FAST_FUZZ_EXAMPLES`` scales
the count (``make fuzz`` runs ten times as many).

- cpu (the C++ kernels): float64, float32 and bfloat16, 4 x 500 cases;
- reference: 4 x 100; triton, interpreted on CPU tensors (float32, no projections): 4 x 12.

bfloat16 follows the house rule: the error against an fp32 torch run is at most twice torch's own
bfloat16 error (plus a small absolute floor, since at these sizes torch's error can be ~0). relu's
derivative jumps at 0, so a bfloat16 rounding near it flips a gradient (torch's bfloat16 run flips
others): where the rule fails for RNN_RELU, the result must equal the float32 function rounded to
bfloat16 where the op rounds (``SameRounding``), which no rounding can flip.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN, reference

SCALE = float(os.environ.get("BIRNN_FAST_FUZZ_EXAMPLES", "1"))
CELLS = {
    "LSTM": (FastBiLSTM, nn.LSTM, {}),
    "GRU": (FastBiGRU, nn.GRU, {}),
    "RNN_TANH": (FastBiRNN, nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (FastBiRNN, nn.RNN, {"nonlinearity": "relu"}),
}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
DTYPES = {
    # bfloat16 a fifth of the time: torch's own bfloat16 run on CPU (its oracle) costs 5x the others.
    "cpu": [torch.float64, torch.float32, torch.float64, torch.float32, torch.bfloat16],
    "reference": [torch.float64, torch.float32],
    "triton": [torch.float32],
}
EXAMPLES = {"cpu": 500, "reference": 100, "triton": 12}


@st.composite
def cases(draw, cell, backend):
    """One layer and its inputs, as plain values (the tensors are made from ``seed``)."""
    dtype = draw(st.sampled_from(DTYPES[backend]), "dtype")
    T = draw(st.integers(1, 6), "T")
    B = draw(st.integers(0, 4), "B")
    lengths_kind = draw(st.sampled_from(["none", "equal", "mixed"]) if B else st.just("none"), "lengths")
    if lengths_kind == "equal":
        lengths = [draw(st.integers(1, T), "length")] * B
    elif lengths_kind == "mixed":
        lengths = draw(st.lists(st.sampled_from([1, T]) | st.integers(1, T), min_size=B, max_size=B), "lengths")
    else:
        lengths = None
    H = draw(st.integers(1, 5), "H")
    proj_size = draw(st.integers(0, H - 1), "proj_size") if cell == "LSTM" and backend != "triton" and H > 1 else 0
    return dict(
        dtype=dtype, T=T, B=B, I=draw(st.integers(1, 4), "I"), H=H, proj_size=proj_size,
        layers=draw(st.integers(1, 2), "layers"), bias=draw(st.booleans(), "bias"),
        batch_first=draw(st.booleans(), "batch_first"), lengths=lengths,
        packed_input=lengths is not None and draw(st.booleans(), "packed_input"),
        hx=draw(st.booleans(), "hx"), seed=draw(st.integers(0, 2**31 - 1), "seed"))


def make_modules(cell, case):
    fast_cls, torch_cls, extra = CELLS[cell]
    kwargs = dict(num_layers=case["layers"], bias=case["bias"], batch_first=case["batch_first"], **extra)
    if case["proj_size"]:
        kwargs["proj_size"] = case["proj_size"]
    reference_dtype = torch.float32 if case["dtype"] == torch.bfloat16 else case["dtype"]
    with torch.random.fork_rng(devices=[]):  # the case alone decides the weights: replays reproduce
        torch.manual_seed(case["seed"])
        fast = fast_cls(case["I"], case["H"], dtype=case["dtype"], **kwargs)
    expected = torch_cls(case["I"], case["H"], bidirectional=True, dtype=reference_dtype, **kwargs)
    expected.load_state_dict(fast.state_dict())
    return fast, expected


def make_inputs(cell, case):
    """input, hx (or None) and the cotangents of output, h_n, c_n, in the float64 master copy."""
    generator = torch.Generator().manual_seed(case["seed"])
    T, B, I, H, P, L = case["T"], case["B"], case["I"], case["H"], case["proj_size"] or case["H"], case["layers"]

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = normal(B, T, I) if case["batch_first"] else normal(T, B, I)
    hx = None
    if case["hx"]:
        hx = (normal(2 * L, B, P), normal(2 * L, B, H)) if cell == "LSTM" else (normal(2 * L, B, P),)
    cotangents = [normal(T, B, 2 * P), normal(2 * L, B, P)] + ([normal(2 * L, B, H)] if cell == "LSTM" else [])
    if case["batch_first"]:
        cotangents[0] = cotangents[0].transpose(0, 1)
    return x, hx, cotangents


def run(module, cell, case, x, hx, cotangents, dtype, packed):
    """Outputs (output padded with zeros, h_n, c_n) and the gradients of input, hx and every parameter."""
    x = x.to(dtype).requires_grad_()
    hx = None if hx is None else tuple(h.to(dtype).requires_grad_() for h in hx)
    leaves = [x, *(hx or ())]
    state_in = None if hx is None else (hx if cell == "LSTM" else hx[0])
    lengths = case["lengths"]
    if packed:
        packed_x = pack_padded_sequence(x, torch.tensor(lengths), batch_first=case["batch_first"],
                                        enforce_sorted=False)
        output, state = module(packed_x, state_in)
        output = pad_packed_sequence(output, batch_first=case["batch_first"], total_length=case["T"])[0]
    elif lengths is not None:
        output, state = module(x, state_in, lengths=lengths)
    else:
        output, state = module(x, state_in)
    results = [output, *(state if cell == "LSTM" else (state,))]
    loss = sum((result.double() * cotangent).sum() for result, cotangent in zip(results, cotangents))
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()), allow_unused=True,
                                    materialize_grads=True)
    else:  # B = 0 without hx: nothing depends on any leaf
        grads = [torch.zeros_like(leaf) for leaf in leaves + list(module.parameters())]
    names = ["output", "h_n", "c_n"][:len(results)] + ["grad input"] + ["grad h0", "grad c0"][:len(hx or ())]
    names += [f"grad {name}" for name, _ in module.named_parameters()]
    return dict(zip(names, [t.detach().double() for t in results + list(grads)]))


class SameRounding(nn.Module):
    """A bfloat16 ``fast`` module's function in float32 through the reference, rounded to bfloat16
    exactly where the C++ op rounds: its input and hx, each layer's output and state (and so each
    layer's incoming gradient), every gradient it returns."""

    def __init__(self, fast, cell):
        super().__init__()
        self.cell, self.layers, self.batch_first = cell, fast.num_layers, fast.batch_first
        for name, parameter in fast.named_parameters():
            self.register_parameter(name, nn.Parameter(parameter.detach().float()))

    def stacked(self, kind, layer, rows=None):  # rows: of a missing bias
        both = [getattr(self, f"{kind}_l{layer}{suffix}", None) for suffix in ("", "_reverse")]
        return torch.zeros(2, rows) if both[0] is None else torch.stack(both)

    def forward(self, x, state=None, lengths=None):
        def rounded(tensor):
            return tensor.to(torch.bfloat16).float()

        x = rounded(x.transpose(0, 1) if self.batch_first else x)
        T, B = x.shape[:2]
        lengths = torch.tensor(lengths if lengths is not None else [T] * B)
        h0 = rounded(state[0] if self.cell == "LSTM" else state) if state is not None else None
        c0 = rounded(state[1]) if state is not None and self.cell == "LSTM" else None
        h_n, c_n = [], []
        for layer in range(self.layers):
            w_ih, w_hh = self.stacked("weight_ih", layer), self.stacked("weight_hh", layer)
            b_ih, b_hh = self.stacked("bias_ih", layer, w_ih.shape[1]), self.stacked("bias_hh", layer, w_ih.shape[1])
            w_hr = getattr(self, f"weight_hr_l{layer}", None)
            w_hr = None if w_hr is None else torch.stack([w_hr, getattr(self, f"weight_hr_l{layer}_reverse")])
            h = x.new_zeros(2, B, w_hh.shape[-1]) if h0 is None else h0[2 * layer:2 * layer + 2]
            c = (x.new_zeros(2, B, w_ih.shape[1] // 4) if c0 is None else c0[2 * layer:2 * layer + 2]) \
                if self.cell == "LSTM" else x.new_empty(0)
            x, h, c = (rounded(t) for t in reference.birnn_layer(self.cell, x, w_ih, w_hh, b_ih, b_hh, h, c,
                                                                 lengths, w_hr))
            h_n.append(h)
            c_n.append(c)
        output = x.transpose(0, 1) if self.batch_first else x
        h_n = torch.cat(h_n)
        return output, ((h_n, torch.cat(c_n)) if self.cell == "LSTM" else h_n)


def error(actual, expected):
    return (actual - expected).norm().item()


def check(cell, case):
    fast, expected = make_modules(cell, case)
    x, hx, cotangents = make_inputs(cell, case)
    dtype = case["dtype"]
    torch_packed = case["lengths"] is not None
    want = run(expected, cell, case, x, hx, cotangents, expected.weight_ih_l0.dtype, torch_packed)
    got = run(fast, cell, case, x, hx, cotangents, dtype, case["packed_input"])
    assert list(got) == list(want)
    if dtype == torch.bfloat16:
        expected.to(dtype)
        same_dtype = run(expected, cell, case, x, hx, cotangents, dtype, torch_packed)
        if cell == "RNN_RELU":
            same_rounding = run(SameRounding(fast, cell), cell, case, x, hx, cotangents, dtype, packed=False)
    for name, expected_value in want.items():
        actual = got[name]
        assert actual.shape == expected_value.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected_value.shape)}"
        assert torch.isfinite(actual).all(), f"{name}: non-finite values"
        if case["lengths"] is not None and name == "output":
            padded = torch.arange(case["T"])[:, None] >= torch.tensor(case["lengths"])[None, :]
            padded = padded.t() if case["batch_first"] else padded
            assert (actual[padded] == 0).all(), "output: nonzero at padded steps"
        scale = expected_value.norm().item()
        if dtype == torch.bfloat16:
            allowed = 2 * error(same_dtype[name], expected_value) + 2e-2 * (scale + 1)
            if cell == "RNN_RELU" and error(actual, expected_value) > allowed:
                expected_value, scale = same_rounding[name], same_rounding[name].norm().item()
                allowed = 5e-2 * (scale + 1e-1)  # the backward reads h from the bfloat16 output
        else:
            allowed = TOLERANCE[dtype] * (scale + 1e-3)
        assert error(actual, expected_value) <= allowed, (
            f"{name}: error {error(actual, expected_value):.3g} > {allowed:.3g} (norm {scale:.3g})")


def fuzz(backend):
    @pytest.mark.parametrize("cell", CELLS)
    @settings(derandomize=True, deadline=None, database=None, max_examples=max(1, int(EXAMPLES[backend] * SCALE)),
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def test(use_backend, cell, data):
        case = data.draw(cases(cell, backend), "case")
        if not getattr(use_backend, "used", False):  # once per test: the fixture outlives the examples
            use_backend(backend, torch.float32 if backend == "triton" else torch.float64)
            use_backend.used = True
        check(cell, case)

    return test


test_fuzz_cpu = fuzz("cpu")
test_fuzz_reference = fuzz("reference")
test_fuzz_triton = fuzz("triton")
