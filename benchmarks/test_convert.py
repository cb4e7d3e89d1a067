"""A real third-party model before and after birnn_fast.convert: one training step of ESPnet's
RNN speech encoder (espnet.nets.pytorch_backend.rnn.encoders.Encoder, "blstmp": 4 bidirectional
LSTM layers of 320 units with a projection and frame subsampling after each), unmodified, on a
sorted PackedSequence as ESPnet calls it. The pair joins test_speed.py's summary.

    pytest benchmarks/test_convert.py
"""
import copy
import time

import numpy as np
import pytest
import torch

import birnn_fast
from birnn_fast import backends
from workloads import rounds_for

# (T, B, features); ESPnet sorts a batch by length, longest first.
STEPS, BATCH, FEATURES = 200, 8, 80
LAYERS, UNITS, PROJECTIONS, SUBSAMPLE = 4, 320, 320, [1, 2, 2, 1, 1]
NAME = f"espnet-blstmp(T{STEPS},B{BATCH},I{FEATURES},H{UNITS})-L{LAYERS}-train-varlen"


class EncoderStep:
    """Both encoders (same weights), the input and lengths; `step(impl)` is one training step."""

    def __init__(self, max_steps=None):
        encoders = pytest.importorskip(
            "espnet.nets.pytorch_backend.rnn.encoders",
            reason="espnet is not installed (the Makefile installs it: pip install --no-deps espnet typeguard)")
        torch.manual_seed(0)
        steps = min(STEPS, max_steps or STEPS)
        torch_model = encoders.Encoder("blstmp", FEATURES, LAYERS, UNITS, PROJECTIONS, np.array(SUBSAMPLE), 0.0)
        self.models = {"torch": torch_model, "fast": birnn_fast.convert(copy.deepcopy(torch_model))}
        generator = torch.Generator().manual_seed(1)
        self.input = torch.randn(BATCH, steps, FEATURES, generator=generator)
        lengths = torch.randint(max(1, steps // 4), steps + 1, (BATCH,), generator=generator)
        self.lengths = lengths.sort(descending=True).values
        self.lengths[0] = steps
        self.tokens = int(self.lengths.sum())
        self.flops = self._useful_flops()

    def _useful_flops(self):
        """Training flops of the LSTM layers on the real frames each layer sees (3x the forward's)."""
        lengths, total = self.lengths.clone(), 0
        for layer in range(LAYERS):
            inputs = FEATURES if layer == 0 else PROJECTIONS
            total += 3 * int(lengths.sum()) * 2 * 2 * 4 * UNITS * (inputs + UNITS)
            if SUBSAMPLE[layer + 1] > 1:
                lengths = (lengths + 1) // SUBSAMPLE[layer + 1]
        return total

    def step(self, impl):
        model = self.models[impl]
        model.zero_grad(set_to_none=True)
        output, _, _ = model(self.input, self.lengths)
        output.square().mean().backward()
        return output


@pytest.mark.parametrize("impl", ["torch", "fast"])
def test_espnet_encoder_training_step(benchmark, request, impl, speed_results):
    encoder = EncoderStep(max_steps=16 if benchmark.disabled else None)
    benchmark.group = NAME
    benchmark.extra_info.update(tokens=encoder.tokens, flops=encoder.flops, threads=torch.get_num_threads(),
                                backend=backends.select(torch.device("cpu"), torch.float32) if impl == "fast" else "torch")
    if benchmark.disabled:
        output = benchmark(encoder.step, impl)
    else:
        max_time = float(request.config.getoption("benchmark_max_time"))
        # As test_speed.py: a first call warms up, a second sizes the rounds unless the first already
        # took longer than max_time.
        probe = _seconds(encoder.step, impl)
        if probe < max_time:
            probe = _seconds(encoder.step, impl)
        rounds = rounds_for(probe, max_time)
        output = benchmark.pedantic(encoder.step, args=(impl,), rounds=rounds, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(tokens_per_s=encoder.tokens / median, gflop_per_s=encoder.flops / median / 1e9)
        speed_results.append((NAME, impl, median, benchmark.extra_info))
    assert output.shape[0] == BATCH and output.shape[-1] == PROJECTIONS and torch.isfinite(output).all()


def _seconds(function, *args):
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start
