"""The CPU kernels' buffer cache (csrc/cpu/buffers.h): a training step after the first faults in
none of its large buffers again, freed blocks are reused, the cache is bounded and can be emptied
or turned off, and reused memory never leaks one call's values into another's results."""
import os
import resource
import subprocess
import sys

import pytest
import torch

from birnn_fast import FastBiLSTM

from conftest import require


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    require("cpu", torch.float32, torch.device("cpu"))
    monkeypatch.setenv("BIRNN_FAST_BACKEND", "cpu")


def training_step(module, x, lengths):
    module.zero_grad(set_to_none=True)
    output, _ = module(x, lengths=lengths)
    output.sum().backward()
    return [output.detach(), *(p.grad for p in module.parameters())]


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_second_training_step_faults_in_no_buffer():
    # Large enough that every buffer of the step is a cache block: W_hh's gradient is 4 MiB a direction.
    torch.manual_seed(0)
    module = FastBiLSTM(96, 512)
    x = torch.randn(40, 8, 96, requires_grad=True)
    lengths = torch.tensor([40, 31, 40, 7, 22, 40, 1, 18])
    training_step(module, x, lengths)
    before = minor_faults()
    training_step(module, x, lengths)
    faults = minor_faults() - before
    # With the cache off (BIRNN_FAST_CPU_CACHE_MB=0): about 1,000, a fault per page of the large buffers.
    assert faults < 400, faults


def test_reused_blocks_give_equal_results():
    torch.manual_seed(1)
    module = FastBiLSTM(33, 200, num_layers=2)
    x = torch.randn(29, 5, 33, requires_grad=True)
    lengths = torch.tensor([29, 3, 17, 29, 11])
    first = training_step(module, x, lengths)
    # Other sizes in between, so that the blocks come back holding another call's values.
    training_step(module, torch.randn(17, 9, 33, requires_grad=True), torch.full((9,), 17))
    second = training_step(module, x, lengths)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(first[0][20:, 1], torch.zeros(9, 400))  # padding


def test_empty_cache():
    module = FastBiLSTM(64, 256)
    training_step(module, torch.randn(30, 8, 64, requires_grad=True), torch.full((8,), 30))
    assert torch.ops.birnn_fast_cpu.cache_bytes() > 0
    released = torch.ops.birnn_fast_cpu.empty_cache()
    assert released > 0
    assert torch.ops.birnn_fast_cpu.cache_bytes() == 0
    training_step(module, torch.randn(30, 8, 64, requires_grad=True), torch.full((8,), 30))


def run_fresh(code, env_value):
    env = dict(os.environ, BIRNN_FAST_CPU_CACHE_MB=env_value, BIRNN_FAST_BACKEND="cpu")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


STEP = """
import torch
from birnn_fast import FastBiLSTM
module = FastBiLSTM(64, 256)
for _ in range(2):
    out, _ = module(torch.randn(30, 8, 64, requires_grad=True))
    out.sum().backward()
print(torch.ops.birnn_fast_cpu.cache_bytes(), torch.ops.birnn_fast_cpu.engine_info())
"""


def test_limit_zero_turns_the_cache_off():
    result = run_fresh(STEP, "0")
    assert result.returncode == 0, result.stderr
    cached, info = result.stdout.split(" ", 1)
    assert cached == "0"
    assert "buffer_cache_mb=0" in info


def test_limit_bounds_the_cache():
    result = run_fresh(STEP, "1")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split(" ", 1)[0]) <= 1 << 20


def test_bad_limit_names_the_variable():
    result = run_fresh(STEP, "lots")
    assert result.returncode != 0
    assert "BIRNN_FAST_CPU_CACHE_MB must be a whole number of megabytes" in result.stderr
