"""birnn_fast.convert / revert: a model built with torch's bidirectional layers, converted, computes
what it computed before (outputs, final states, every gradient), keeps its state_dict, Parameter
objects, training mode and hooks, and still works as its library calls it: PackedSequence (sorted or
not), padded input, hx or not, flatten_parameters(), .to(), DataParallel / DDP, torch.compile,
pickling. ESPnet's RNN encoders stand for a real third-party model."""
import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._pytree import tree_leaves

import birnn_fast
from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

INPUT, HIDDEN, STEPS, BATCH = 5, 6, 7, 4
LENGTHS = [7, 3, 5, 1]  # unsorted, with 1 and T
FAST = (FastBiLSTM, FastBiGRU, FastBiRNN)
TORCH = (nn.LSTM, nn.GRU, nn.RNN)


class Nested(nn.Module):
    """Every cell and option at some depth: a ModuleList holding an LSTM with projections and a
    Sequential holding a GRU without biases, a ModuleDict of tanh and relu RNNs, and a
    unidirectional LSTM, which must stay torch's."""

    def __init__(self, batch_first=False):
        super().__init__()
        options = dict(batch_first=batch_first, bidirectional=True)
        self.layers = nn.ModuleList([
            nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=3, **options),
            nn.Sequential(nn.GRU(INPUT, HIDDEN, bias=False, **options)),
        ])
        self.by_name = nn.ModuleDict({
            "tanh": nn.RNN(INPUT, HIDDEN, num_layers=2, **options),
            "relu": nn.RNN(INPUT, HIDDEN, nonlinearity="relu", **options),
        })
        self.one_way = nn.LSTM(INPUT, HIDDEN, batch_first=batch_first)

    def rnns(self):
        return [self.layers[0], self.layers[1][0], self.by_name["tanh"], self.by_name["relu"], self.one_way]

    def forward(self, x, states=None):
        results = []
        for rnn, hx in zip(self.rnns(), states or [None] * 5):
            results.append(rnn(x, hx))
        return results


def states_for(model, batch, dtype, generator):
    """Random hx for each layer of a Nested model, in the shapes torch asks."""
    states = []
    for rnn in model.rnns():
        directions = 2 if rnn.bidirectional else 1
        h = torch.randn(directions * rnn.num_layers, batch, rnn.proj_size or rnn.hidden_size, dtype=dtype,
                        generator=generator)
        c = torch.randn(directions * rnn.num_layers, batch, rnn.hidden_size, dtype=dtype, generator=generator)
        states.append((h, c) if rnn.mode == "LSTM" else h)
    return states


def floating(leaves):
    return [leaf for leaf in leaves if leaf.is_floating_point()]


def run(model, make_input, states):
    """Outputs of the model (every leaf, PackedSequence fields included) and the gradients of a
    weighted sum of them w.r.t. the input and every parameter."""
    x = make_input()
    outputs = [leaf for leaf in tree_leaves(model(x, states)) if leaf is not None]
    weights = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, dtype=out.dtype, generator=weights)).sum() for out in floating(outputs))
    parameters = [p for p in model.parameters() if p.requires_grad]
    leaves = [make_input.leaf, *parameters]
    grads = torch.autograd.grad(loss, leaves)
    return outputs, grads


def assert_same_results(got, want):
    (outputs, grads), (expected_outputs, expected_grads) = got, want
    assert len(outputs) == len(expected_outputs)
    for a, b in zip(outputs, expected_outputs):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        else:
            assert torch.equal(a, b)
    assert len(grads) == len(expected_grads)
    for a, b in zip(grads, expected_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


class Inputs:
    """Builds the same input, a fresh leaf each call, as padded (batch_first or not) or packed."""

    def __init__(self, kind, batch_first):
        generator = torch.Generator().manual_seed(0)
        self.padded = torch.randn(BATCH, STEPS, INPUT, dtype=torch.float64, generator=generator)
        self.kind, self.batch_first = kind, batch_first
        self.leaf = None

    def __call__(self):
        self.leaf = self.padded.clone().requires_grad_()
        x = self.leaf if self.batch_first else self.leaf.transpose(0, 1)
        if self.kind == "padded":
            return x
        lengths = torch.tensor(LENGTHS)
        if self.kind == "packed_sorted":
            lengths = lengths.sort(descending=True).values
        return pack_padded_sequence(x, lengths, batch_first=self.batch_first,
                                    enforce_sorted=self.kind == "packed_sorted")


@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("kind, batch_first", [("padded", True), ("padded", False), ("packed_sorted", False),
                                               ("packed_unsorted", True)])
def test_nested_model_computes_what_it_did(kind, batch_first, with_hx):
    torch.manual_seed(0)
    model = Nested(batch_first).double()
    original = copy.deepcopy(model)
    converted, names = birnn_fast.convert(model, return_names=True)
    assert converted is model
    assert names == ["layers.0", "layers.1.0", "by_name.tanh", "by_name.relu"]
    assert [type(rnn) for rnn in model.rnns()] == [FastBiLSTM, FastBiGRU, FastBiRNN, FastBiRNN, nn.LSTM]
    assert model.by_name["relu"].nonlinearity == "relu" and model.layers[0].proj_size == 3
    states = states_for(model, BATCH, torch.float64, torch.Generator().manual_seed(2)) if with_hx else None
    make_input = Inputs(kind, batch_first)
    assert_same_results(run(model, make_input, states), run(original, make_input, states))


def test_state_dict_parameters_and_mode_unchanged():
    torch.manual_seed(0)
    model = Nested().double().eval()
    model.layers[0].weight_hh_l0.requires_grad_(False)
    parameters = dict(model.named_parameters())
    before = {key: value.clone() for key, value in model.state_dict().items()}
    birnn_fast.convert(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]) and after[key].dtype == torch.float64
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
    assert not model.layers[0].weight_hh_l0.requires_grad and model.layers[0].weight_ih_l0.requires_grad
    assert not any(module.training for module in model.modules())
    # Checkpoints load both ways.
    fresh_torch = Nested().double()
    fresh_torch.load_state_dict(model.state_dict())
    birnn_fast.convert(Nested().double()).load_state_dict(fresh_torch.state_dict())


def test_revert_gives_torch_modules_back():
    torch.manual_seed(0)
    model = Nested().double()
    original = copy.deepcopy(model)
    birnn_fast.convert(model)
    reverted, names = birnn_fast.revert(model, return_names=True)
    assert names == ["layers.0", "layers.1.0", "by_name.tanh", "by_name.relu"]
    assert [type(rnn) for rnn in reverted.rnns()] == [nn.LSTM, nn.GRU, nn.RNN, nn.RNN, nn.LSTM]
    assert b"birnn_fast" not in pickle.dumps(reverted.rnns())
    make_input = Inputs("packed_unsorted", False)
    assert_same_results(run(reverted, make_input, None), run(original, make_input, None))
    # A layer built as FastBi* reverts too.
    assert type(birnn_fast.revert(FastBiGRU(3, 4))) is nn.GRU


def test_the_module_itself_and_shared_layers():
    layer = nn.GRU(3, 4, bidirectional=True)
    converted, names = birnn_fast.convert(layer, return_names=True)
    assert converted is layer and type(layer) is FastBiGRU and names == [""]
    shared = nn.LSTM(3, 4, bidirectional=True)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    _, names = birnn_fast.convert(model, return_names=True)
    assert names == ["a"] and model["a"] is model["b"][0] and type(shared) is FastBiLSTM


def test_cells_selects_what_is_converted():
    model = Nested()
    _, names = birnn_fast.convert(model, cells=("GRU",), return_names=True)
    assert names == ["layers.1.0"]
    assert [type(rnn) for rnn in model.rnns()] == [nn.LSTM, FastBiGRU, nn.RNN, nn.RNN, nn.LSTM]
    _, names = birnn_fast.convert(model, cells="RNN", return_names=True)
    assert names == ["by_name.tanh", "by_name.relu"]
    with pytest.raises(ValueError, match=r"cells must be a subset of \('LSTM', 'GRU', 'RNN'\)"):
        birnn_fast.convert(model, cells=("LSTM", "CNN"))


class OwnForward(nn.LSTM):
    def forward(self, input, hx=None):
        output, state = super().forward(input, hx)
        return output * 2, state


def test_what_cannot_be_converted_is_left_alone_with_a_warning():
    model = nn.ModuleDict({
        "subclass": OwnForward(3, 4, bidirectional=True),
        "parametrized": nn.GRU(3, 4, bidirectional=True),
        "patched": nn.RNN(3, 4, bidirectional=True),
        "plain": nn.LSTM(3, 4, bidirectional=True),
    })
    torch.nn.utils.parametrize.register_parametrization(model["parametrized"], "weight_hh_l0", nn.Identity())
    model["patched"].forward = lambda *args, **kwargs: None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, names = birnn_fast.convert(model, return_names=True)
    assert names == ["plain"]
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 3, messages
    assert "left `subclass` (OwnForward)" in messages[0] and "a subclass of nn.LSTM" in messages[0]
    assert "left `parametrized`" in messages[1] and "parametrized" in messages[1]
    assert "left `patched` (RNN)" in messages[2] and "forward was replaced" in messages[2]
    assert type(model["subclass"]) is OwnForward and type(model["patched"]) is nn.RNN
    assert isinstance(model["parametrized"], nn.GRU)
    assert caught[0].filename == __file__  # the warning points at the caller of convert


def test_hooks_still_fire_and_their_handles_still_remove():
    torch.manual_seed(0)
    layers, calls, handles = [], {}, {}
    for kind in ("torch", "converted"):
        layer = nn.LSTM(3, 4, bidirectional=True)
        log = calls[kind] = []
        handles[kind] = [
            layer.register_forward_pre_hook(lambda module, args, log=log: log.append(("pre", args[0].shape))),
            layer.register_forward_hook(lambda module, args, output, log=log: log.append(("forward", output[0].shape))),
            layer.register_full_backward_hook(
                lambda module, grad_in, grad_out, log=log: log.append(("backward", [None if g is None else g.shape for g in grad_out]))),
        ]
        layers.append(layer)
    birnn_fast.convert(layers[1])
    x = torch.randn(5, 2, 3)
    for layer in layers:
        layer(x.clone().requires_grad_())[0].sum().backward()
    assert calls["converted"] == calls["torch"] and len(calls["torch"]) == 3
    for handle in handles["converted"]:
        handle.remove()
    calls["converted"].clear()
    layers[1](x.clone().requires_grad_())[0].sum().backward()
    assert calls["converted"] == []


def test_flatten_parameters_to_and_lengths_as_numpy():
    torch.manual_seed(0)
    model = Nested(batch_first=True)
    original = copy.deepcopy(model)
    birnn_fast.convert(model)
    for rnn in model.rnns():
        rnn.flatten_parameters()  # what library code calls in training; a no-op on CPU, as for torch's
    model.to(torch.float64)
    original.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    make_input = Inputs("packed_unsorted", True)
    assert_same_results(run(model, make_input, None), run(original, make_input, None))
    # lengths= from a data pipeline's numpy array, on a converted layer.
    x = torch.randn(BATCH, STEPS, INPUT, dtype=torch.float64)
    lstm = model.layers[0]
    got, _ = lstm(x, lengths=np.array(LENGTHS))
    want, _ = lstm(x, lengths=torch.tensor(LENGTHS))
    assert torch.equal(got, want)


def test_pickle_deepcopy_and_torch_save():
    torch.manual_seed(0)
    model = birnn_fast.convert(Nested().double())
    make_input = Inputs("packed_unsorted", False)
    want = run(model, make_input, None)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert [type(rnn) for rnn in other.rnns()] == [FastBiLSTM, FastBiGRU, FastBiRNN, FastBiRNN, nn.LSTM]
        assert_same_results(run(other, make_input, None), want)


class Classifier(nn.Module):
    """A model as libraries write them: padded batch, packed for the RNN, unpacked, pooled."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(INPUT, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * HIDDEN, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        return self.out(torch.cat([h_n[-2], h_n[-1]], dim=-1))


class PaddedClassifier(Classifier):
    """The same model as a converted one can be written: lengths= instead of packing."""

    def forward(self, x, lengths):
        _, (h_n, _) = self.rnn(x, lengths=lengths)
        return self.out(torch.cat([h_n[-2], h_n[-1]], dim=-1))


def gradients(model, x, lengths):
    x = x.clone().requires_grad_()
    output = model(x, lengths)
    output.square().sum().backward()
    grads = [x.grad, *(p.grad for p in model.parameters())]
    model.zero_grad(set_to_none=True)
    return output, grads


@pytest.mark.parametrize("model_class", [Classifier, PaddedClassifier])
def test_compile_of_the_whole_model(model_class):
    torch.manual_seed(0)
    model = model_class()
    torch_model = copy.deepcopy(model)
    torch_model.__class__ = Classifier
    birnn_fast.convert(model)
    x, lengths = torch.randn(BATCH, STEPS, INPUT), torch.tensor(LENGTHS)
    # A converted layer called with lengths= has no graph break left: fullgraph compiles.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=model_class is PaddedClassifier)
    got, want = gradients(compiled, x, lengths), gradients(torch_model, x, lengths)
    for a, b in zip(tree_leaves(got), tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_data_parallel_and_ddp_wrapping(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    torch_model = copy.deepcopy(model)
    birnn_fast.convert(model)
    x, lengths = torch.randn(BATCH, STEPS, INPUT), torch.tensor(LENGTHS)
    want = gradients(torch_model, x, lengths)
    got = gradients(nn.DataParallel(model), x, lengths)
    for a, b in zip(tree_leaves(got), tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        got = gradients(nn.parallel.DistributedDataParallel(model), x, lengths)
    finally:
        dist.destroy_process_group()
    for a, b in zip(tree_leaves(got), tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ESPnet's RNN encoders (espnet.nets.pytorch_backend.rnn.encoders, used by its ASR and ST recipes and
# wrapped by espnet2's RNNEncoder): VGG front end, then bidirectional LSTM / GRU layers called on a
# sorted PackedSequence, flatten_parameters() in training, layers named birnn0, birnn1 (getattr).
ESPNET_TYPES = ["vggblstmp", "blstm", "bgrup", "vggbgru"]


def espnet_encoder(etype):
    encoders = pytest.importorskip(
        "espnet.nets.pytorch_backend.rnn.encoders",
        reason="espnet is not installed (the Makefile installs it: pip install --no-deps espnet typeguard)")
    return encoders.Encoder(etype, idim=20, elayers=2, eunits=16, eprojs=12, subsample=np.array([1, 2, 1]),
                            dropout=0.0)


@pytest.mark.parametrize("etype", ESPNET_TYPES)
def test_espnet_encoder_computes_what_it_did(etype):
    torch.manual_seed(0)
    model = espnet_encoder(etype).double().train()
    original = copy.deepcopy(model)
    _, names = birnn_fast.convert(model, return_names=True)
    assert len(names) == (1 if etype in ("blstm", "vggbgru") else 2), names
    assert list(model.state_dict()) == list(original.state_dict())
    features = torch.randn(3, 23, 20, dtype=torch.float64)
    lengths = torch.tensor([23, 17, 9])  # ESPnet sorts its batches by length

    def results(encoder):
        x = features.clone().requires_grad_()
        output, output_lengths, _ = encoder(x, lengths)
        (output * torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)).sum().backward()
        return output, output_lengths, x.grad, [p.grad for p in encoder.parameters()]

    got, want = results(model), results(original)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    assert torch.equal(torch.as_tensor(got[1]), torch.as_tensor(want[1]))
    for a, b in zip([got[2], *got[3]], [want[2], *want[3]]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
