"""The CPU workloads the benchmarks time: a FastBi* layer and the torch layer it replaces, with
identical weights and inputs, and the one step a user would run with each.

Shared by test_speed.py (timing) and peak_memory.py (one training step per process).
"""
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

# (T, B, I, H)
SHAPES = {
    "tiny": (4, 1, 16, 32),
    "sentiment": (64, 32, 256, 256),
    "tagging": (128, 64, 300, 256),
    # Real clients: a TTS duration / prosody predictor, a diarization segmentation stack, a speech encoder.
    "tts": (200, 1, 512, 256),
    "diarization": (589, 32, 60, 128),
    "speech": (400, 16, 80, 512),
}
# Issue 34's sweep: every (T, B, I, H) of these, each cell, fp32 and bf16, training with and without
# the input gradient and inference, equal lengths and lengths against a PackedSequence.
SWEEP_STEPS, SWEEP_BATCHES = (16, 75, 300), (1, 4, 16, 64)
SWEEP_INPUTS, SWEEP_HIDDEN = (128, 512, 1024, 2560), (128, 512, 1024)


def sweep_shape(steps, batch, inputs, hidden):
    """The SHAPES key of a sweep shape, registered on first use."""
    name = f"T{steps}B{batch}I{inputs}H{hidden}"
    SHAPES.setdefault(name, (steps, batch, inputs, hidden))
    return name


MODULES = {
    "LSTM": (nn.LSTM, FastBiLSTM, 4),
    "GRU": (nn.GRU, FastBiGRU, 3),
    "RNN": (nn.RNN, FastBiRNN, 1),
}
SEED = 0


@dataclass(frozen=True)
class Case:
    cell: str  # LSTM, GRU, RNN (tanh)
    shape: str  # a key of SHAPES
    layers: int
    mode: str  # infer, train
    lengths: str  # equal, varlen
    # float32; bfloat16 (model and input in bf16 on both sides); autocast (an fp32 model under
    # torch.autocast("cpu", torch.bfloat16))
    precision: str = "float32"
    # Training: whether the input needs a gradient (False: features, as a speech encoder's, or a
    # frozen embedding; both sides then skip what they can).
    input_grad: bool = True

    @property
    def name(self):
        steps, batch, inputs, hidden = SHAPES[self.shape]
        suffix = "" if self.precision == "float32" else f"-{self.precision}"
        suffix += "" if self.input_grad else "-input-no-grad"
        return (f"{self.cell}-{self.shape}(T{steps},B{batch},I{inputs},H{hidden})-L{self.layers}-"
                f"{self.mode}-{self.lengths}{suffix}")


def all_cases():
    cases = [Case("LSTM", shape, layers, mode, lengths)
             for shape in ("tiny", "sentiment", "tagging") for layers in (1, 2) for mode in ("infer", "train")
             for lengths in ("equal", "varlen")]
    cases += [Case(cell, "sentiment", 1, mode, lengths)
              for cell in ("GRU", "RNN") for mode in ("infer", "train") for lengths in ("equal", "varlen")]
    cases += [Case("LSTM", "sentiment", 1, mode, "equal", "bfloat16") for mode in ("infer", "train")]
    cases += [Case("LSTM", "sentiment", 1, "infer", "equal", "autocast")]
    cases += [Case("LSTM", "sentiment", 1, "train", "equal", input_grad=False)]
    cases += [Case("LSTM", "tts", 1, "infer", "equal"), Case("LSTM", "diarization", 4, "train", "equal"),
              Case("LSTM", "speech", 2, "train", "varlen")]
    return cases


def sweep_cases(cells=("LSTM", "GRU", "RNN"), precisions=("float32", "bfloat16"),
                modes=("train", "train-no-dx", "infer"), lengths=("equal", "varlen"), steps=SWEEP_STEPS,
                batches=SWEEP_BATCHES, inputs=SWEEP_INPUTS, hidden=SWEEP_HIDDEN):
    """The sweep's cases (one layer), the grid narrowed by any of its axes."""
    return [Case(cell, sweep_shape(t, b, i, h), 1, "infer" if mode == "infer" else "train", length, precision,
                 input_grad=mode != "train-no-dx")
            for cell in cells for precision in precisions for mode in modes for length in lengths
            for t in steps for b in batches for i in inputs for h in hidden]


def sweep_sample():
    """The part of the sweep `pytest benchmarks/` times: the LSTM's small batches and wide layers
    (where it has lost to torch), training and inference, and each other cell, bf16 and lengths
    on the speech encoder's layer."""
    cases = sweep_cases(cells=("LSTM",), precisions=("float32",), modes=("train", "infer"), lengths=("equal",),
                        steps=(75,), batches=(1, 4, 16, 64), inputs=(512, 2560), hidden=(512, 1024))
    cases += sweep_cases(cells=("GRU", "RNN"), precisions=("float32",), modes=("train",), lengths=("equal",),
                         steps=(75,), batches=(4,), inputs=(2560,), hidden=(512,))
    cases += sweep_cases(cells=("LSTM",), precisions=("bfloat16",), modes=("train", "infer"), lengths=("equal",),
                         steps=(75,), batches=(4,), inputs=(2560,), hidden=(512,))
    cases += sweep_cases(cells=("LSTM",), precisions=("float32",), modes=("train-no-dx",), lengths=("varlen",),
                         steps=(75,), batches=(4,), inputs=(2560,), hidden=(512,))
    return cases


def make_lengths(steps, batch):
    """Per-row lengths uniform in [T/4, T], the same for every run (own generator)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(max(1, steps // 4), steps + 1, (batch,), generator=generator)


def useful_flops(case, tokens):
    """Forward flops of the real tokens: input GEMM 2*I*G*H plus recurrent GEMM 2*H*G*H per token and
    direction, for every layer; training counts 3x (forward, grad_input, grad_weight)."""
    _, _, inputs, hidden = SHAPES[case.shape]
    gates = MODULES[case.cell][2]
    per_token = 0
    for layer in range(case.layers):
        layer_inputs = inputs if layer == 0 else 2 * hidden
        per_token += 2 * 2 * gates * hidden * (layer_inputs + hidden)
    return per_token * tokens * (3 if case.mode == "train" else 1)


def autocast_honoured(module, x):
    """Whether `module` computes in bf16 under torch.autocast("cpu", torch.bfloat16), as nn.LSTM does."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        return module(x[:1, :1])[0].dtype == torch.bfloat16


class Workload:
    """Both layers of a case, its input, lengths and a random cotangent; `step(impl)` is what is timed.

    For the autocast case the fast side runs under autocast once FastBi* honours it; until then it
    runs a bf16 copy of the model on bf16 input, which is what autocast would run (`emulated`).
    `max_steps` shortens the sequence (a smoke run that only checks the case still runs)."""

    def __init__(self, case, max_steps=None):
        self.case = case
        steps, batch, inputs, hidden = SHAPES[case.shape]
        steps = min(steps, max_steps or steps)
        torch_class, fast_class, _ = MODULES[case.cell]
        torch.manual_seed(SEED)
        self.modules = {"torch": torch_class(inputs, hidden, case.layers, bidirectional=True)}
        self.modules["fast"] = fast_class(inputs, hidden, case.layers)
        self.modules["fast"].load_state_dict(self.modules["torch"].state_dict())
        dtype = torch.bfloat16 if case.precision == "bfloat16" else torch.float32
        for module in self.modules.values():
            module.to(dtype)
        wants_grad = case.mode == "train" and case.input_grad
        self.input = torch.randn(steps, batch, inputs, dtype=dtype, requires_grad=wants_grad)
        self.cotangent = torch.randn(steps, batch, 2 * hidden, dtype=dtype)
        self.emulated = case.precision == "autocast" and not autocast_honoured(self.modules["fast"], self.input)
        if self.emulated:
            self.modules["fast"].to(torch.bfloat16)
        if case.lengths == "varlen":
            self.lengths = make_lengths(steps, batch)
        else:
            self.lengths = torch.full((batch,), steps, dtype=torch.int64)
        self.tokens = int(self.lengths.sum())
        self.flops = useful_flops(case, self.tokens)

    def forward(self, impl):
        """Output (T, B, 2H), zeros past each row's length, as a user would get it from each layer."""
        if self.case.precision == "autocast":
            if impl == "fast" and self.emulated:
                return self._forward(impl, self.input.to(torch.bfloat16))
            with torch.autocast("cpu", torch.bfloat16):
                return self._forward(impl, self.input)
        return self._forward(impl, self.input)

    def _forward(self, impl, x):
        module = self.modules[impl]
        if self.case.lengths == "equal":
            return module(x)[0]
        if impl == "fast":
            return module(x, lengths=self.lengths)[0]
        # Packing and unpacking are part of what a torch user pays for variable lengths.
        packed = pack_padded_sequence(x, self.lengths, enforce_sorted=False)
        output, _ = pad_packed_sequence(module(packed)[0], total_length=x.shape[0])
        return output

    def step(self, impl):
        if self.case.mode == "infer":
            with torch.no_grad():
                return self.forward(impl)
        # Gradients are dropped, not accumulated, as an optimizer's zero_grad(set_to_none=True) would.
        self.modules[impl].zero_grad(set_to_none=True)
        self.input.grad = None
        output = self.forward(impl)
        (output * self.cotangent.to(output.dtype)).sum().backward()
        return output


def rounds_for(seconds_per_call, max_time, min_rounds=3, max_rounds=1000):
    """Rounds that fill about `max_time` seconds, but at least `min_rounds` for the slow cases."""
    return int(min(max_rounds, max(min_rounds, math.ceil(max_time / max(seconds_per_call, 1e-9)))))
