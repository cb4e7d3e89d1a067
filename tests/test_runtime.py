"""The cpu backend in threads and processes: two Python threads (separate modules, one shared eval
module) give what sequential runs give, results are bitwise equal run to run, one intra-op thread
and many agree to rounding, a module used before a fork works in forked DataLoader workers, and
two-rank DistributedDataParallel over gloo gives one process's gradients on the whole batch."""
import datetime
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

from conftest import require

MODULES = {
    "LSTM": lambda **kwargs: FastBiLSTM(**kwargs),
    "LSTM_PROJ": lambda **kwargs: FastBiLSTM(proj_size=5, **kwargs),
    "GRU": lambda **kwargs: FastBiGRU(**kwargs),
    "RNN_TANH": lambda **kwargs: FastBiRNN(nonlinearity="tanh", **kwargs),
    "RNN_RELU": lambda **kwargs: FastBiRNN(nonlinearity="relu", **kwargs),
}
T, B, I, H = 13, 6, 7, 20
LENGTHS = [13, 1, 9, 13, 4, 7]


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    require("cpu", torch.float32, torch.device("cpu"))
    monkeypatch.setenv("BIRNN_FAST_BACKEND", "cpu")


def make_module(kind, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MODULES[kind](input_size=I, hidden_size=H, num_layers=2, dtype=dtype)


def make_batch(seed, dtype=torch.float32, batch=B):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, batch, I, generator=generator, dtype=dtype)
    lengths = torch.tensor((LENGTHS * batch)[:batch])
    return x, lengths


def train_step(module, x, lengths):
    """Output, h_n and the gradients of input and every parameter of sum(output * w) for a fixed w."""
    x = x.detach().requires_grad_()
    output, state = module(x, lengths=lengths)
    h_n = state[0] if isinstance(state, tuple) else state
    weight = torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)
    loss = (output * weight).sum() + h_n.sum()
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [output.detach(), h_n.detach(), *grads]


def assert_bitwise_equal(actual, expected):
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected)):
        assert torch.equal(a, b), f"result {index} differs: max {(a - b).abs().max().item():.3g}"


def run_in_threads(functions):
    results, errors = [None] * len(functions), []
    barrier = threading.Barrier(len(functions))

    def work(index):
        try:
            barrier.wait()
            for _ in range(3):  # several calls each, so that the two threads' calls overlap
                results[index] = functions[index]()
        except BaseException as error:  # noqa: BLE001 -- re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("kind", MODULES)
def test_two_threads_on_separate_modules_equal_sequential_runs(kind):
    modules = [make_module(kind, seed) for seed in (0, 1)]
    batches = [make_batch(seed) for seed in (2, 3)]
    sequential = [train_step(module, *batch) for module, batch in zip(modules, batches)]
    threaded = run_in_threads([lambda m=m, b=b: train_step(m, *b) for m, b in zip(modules, batches)])
    for actual, expected in zip(threaded, sequential):
        assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("kind", MODULES)
def test_two_threads_on_one_shared_eval_module_equal_sequential_runs(kind):
    module = make_module(kind).eval()
    batches = [make_batch(seed) for seed in (2, 3)]

    def infer(batch):
        with torch.no_grad():
            output, state = module(batch[0], lengths=batch[1])
        return [output, *(state if isinstance(state, tuple) else (state,))]

    sequential = [infer(batch) for batch in batches]
    threaded = run_in_threads([lambda b=b: infer(b) for b in batches])
    for actual, expected in zip(threaded, sequential):
        assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", MODULES)
def test_bitwise_equal_run_to_run(kind, dtype):
    module = make_module(kind, dtype=dtype)
    batch = make_batch(2, dtype)
    first = train_step(module, *batch)
    for _ in range(2):
        assert_bitwise_equal(train_step(module, *batch), first)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kind", MODULES)
def test_thread_counts_agree_to_rounding(kind, threads):
    """One intra-op thread runs the directions in turn, chunked; three run the products around the
    recurrences as multi-threaded GEMMs (by_chunks in schedule.h): same numbers to rounding."""
    module = make_module(kind, dtype=torch.float64)
    batch = make_batch(2, torch.float64, batch=40)
    default = train_step(module, *batch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        other = train_step(module, *batch)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(other, default):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, module):
        self.module = module

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return train_step(self.module, *make_batch(10 + index))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_forked_dataloader_workers(kind):
    """The parent runs the module first (its OpenMP pool and our caches are live at the fork)."""
    module = make_module(kind)
    expected = [train_step(module, *make_batch(10 + index)) for index in range(4)]
    loader = torch.utils.data.DataLoader(_Batches(module), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got = list(loader)
    assert len(got) == 4
    for actual, want in zip(got, expected):
        # Workers run one intra-op thread (DataLoader sets it), the parent the default: rounding.
        for a, b in zip(actual, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_bitwise_equal(train_step(module, *make_batch(10)), expected[0])  # the parent still works


DDP_KINDS = ["LSTM_PROJ", "GRU"]
DDP_TIMEOUT_S = 60  # a hung rank fails the test instead of the CI run


def _whole_batch_loss(output, batch):
    weight = torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)
    return (output * weight).sum() / batch


def _ddp_rank(rank, world_size, init_file, result_file):
    torch.set_num_threads(1)
    os.environ["BIRNN_FAST_BACKEND"] = "cpu"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S))
    try:
        grads = {}
        for kind in DDP_KINDS:
            module = make_module(kind, dtype=torch.float64)
            model = DistributedDataParallel(module)
            x, lengths = make_batch(2, torch.float64, batch=world_size * B)
            share = slice(rank * B, (rank + 1) * B)
            output, _ = model(x[:, share], lengths=lengths[share])
            # DDP averages the ranks' gradients of their own batch's mean: the whole batch's mean.
            _whole_batch_loss(output, B).backward()
            grads[kind] = [p.grad for p in module.parameters()]
            # A DistributedDataParallel freed after destroy_process_group could hang in its
            # reducer's destructor (1 run in 3 here): each goes while the group is alive.
            del model, output
        if rank == 0:
            torch.save(grads, result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_gloo_equals_one_process(tmp_path):
    result_file = str(tmp_path / "grads.pt")
    ranks = mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), result_file), nprocs=2, join=False)
    deadline = time.monotonic() + 2 * DDP_TIMEOUT_S
    while not ranks.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the DDP ranks did not finish in {2 * DDP_TIMEOUT_S} s")
    ddp_grads = torch.load(result_file)
    for kind in DDP_KINDS:
        module = make_module(kind, dtype=torch.float64)
        x, lengths = make_batch(2, torch.float64, batch=2 * B)
        output, _ = module(x, lengths=lengths)
        _whole_batch_loss(output, 2 * B).backward()
        for (name, parameter), grad in zip(module.named_parameters(), ddp_grads[kind]):
            torch.testing.assert_close(grad, parameter.grad, rtol=1e-10, atol=1e-12, msg=f"{kind} {name}")
