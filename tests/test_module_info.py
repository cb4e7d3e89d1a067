"""torch's own ModuleInfo samples for nn.LSTM / nn.GRU / nn.RNN (torch.testing._internal.common_modules)
run through FastBiLSTM / FastBiGRU / FastBiRNN with the checks of torch's test/test_modules.py:
every bidirectional sample (the others are not drop-in cases: our layers are bidirectional only),
float32 and float64, train and eval mode, and every error input.

Each check is written as torch's test_modules.py has it (test_forward, test_factory_kwargs,
test_repr, test_pickle, test_non_contiguous_tensors, test_grad, test_gradgrad, test_memory_format,
test_if_train_and_eval_modes_differ, test_device_ctx_init, test_errors; test_cpu_gpu_parity and
test_multiple_device_transfer on CUDA), one test per sample, plus equality with nn.* itself on the
same weights, which torch's tests cannot make.

The gradient checks are the cost (gradgradcheck differentiates the reference's recompute): by default
they run in train mode only (no sample has dropout, so eval computes the same function) and
gradgradcheck checks the total derivative only; ``BIRNN_FAST_MODULE_INFO=full`` runs them as torch
does, both modes and each parameter's partial derivative too (about 8 minutes on 2 cores)."""
import io
import os
from copy import deepcopy
from itertools import chain, product

import pytest
import torch
from torch import nn

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

try:
    from torch._subclasses.meta_utils import assert_metadata_eq
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
    from torch.testing._internal.common_utils import freeze_rng_state, gradcheck, gradgradcheck
except ImportError as error:  # torch's testing package needs expecttest
    if os.environ.get("CI"):
        raise
    pytest.skip(f"torch's ModuleInfo database cannot be imported: {error}", allow_module_level=True)

FAST = {nn.LSTM: FastBiLSTM, nn.GRU: FastBiGRU, nn.RNN: FastBiRNN}
INFOS = {info.module_cls: info for info in module_db if info.module_cls in FAST}
DTYPES = [torch.float32, torch.float64]
FULL = os.environ.get("BIRNN_FAST_MODULE_INFO") == "full"


def samples(torch_cls, dtype, requires_grad, training, device="cpu"):
    info = INFOS[torch_cls]
    inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad, training=training)
    return [sample for sample in inputs if sample.constructor_input.kwargs.get("bidirectional")]


def sample_ids():
    """(nn class, sample index, id) of every bidirectional sample (their count does not depend on dtype)."""
    cases = []
    for torch_cls in FAST:
        for index, sample in enumerate(samples(torch_cls, torch.float64, False, True)):
            kwargs = sample.constructor_input.kwargs
            flags = "-".join(f"{key}={value}" for key, value in kwargs.items()
                             if key in ("bias", "batch_first", "proj_size", "nonlinearity"))
            hx = "hx" if len(sample.forward_input.args) > 1 else "nohx"
            cases.append(pytest.param(torch_cls, index, id=f"{torch_cls.__name__}-{index}-{flags}-{hx}"))
    return cases


SAMPLES = sample_ids()
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
SAMPLE = pytest.mark.parametrize("torch_cls,index", SAMPLES)


def sample_of(torch_cls, index, dtype, requires_grad, training, device="cpu"):
    return samples(torch_cls, dtype, requires_grad, training, device)[index]


def build(torch_cls, sample, dtype, training, device="cpu"):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    module = FAST[torch_cls](*args, **kwargs)
    module.to(device).to(dtype)
    module.train(training)
    return module


def assert_parameters_and_buffers_are(module, device, dtype):
    device = torch.device(device)
    for name, item in chain(module.named_parameters(), module.named_buffers()):
        assert item.device == device, f"{name} is on {item.device}, expected {device}"
        if item.dtype.is_floating_point:
            assert item.dtype == dtype, f"{name} is {item.dtype}, expected {dtype}"


def traverse(obj, func):
    if isinstance(obj, (tuple, list)):
        return type(obj)(traverse(o, func) for o in obj)
    if isinstance(obj, dict):
        return {name: traverse(o, func) for name, o in obj.items()}
    if isinstance(obj, torch.Tensor):
        return func(obj)
    return None


def retain_grad(obj):
    traverse(obj, lambda t: t.retain_grad() if t.requires_grad else None)


def get_grads(obj):
    return traverse(obj, lambda t: t.grad if t.requires_grad else None)


def zero_grad(obj):
    def inner(t):
        t.grad = None
    traverse(obj, inner)


@TRAINING
@DTYPE
@SAMPLE
def test_forward(torch_cls, index, dtype, training):
    sample = sample_of(torch_cls, index, dtype, False, training)
    with freeze_rng_state():
        module = build(torch_cls, sample, dtype, training)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        outputs = module(*args, **kwargs)
        if sample.reference_fn is not None:
            torch.testing.assert_close(outputs, sample.reference_fn(module, *args, **kwargs))
        # Ours, next to torch's own module with the same weights.
        expected = torch_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs).to(dtype)
        expected.load_state_dict(module.state_dict())
        expected.train(training)
        torch.testing.assert_close(outputs, expected(*args, **kwargs))
        (module.float if dtype == torch.float32 else module.double)()
        module(*args, **kwargs)
        assert_parameters_and_buffers_are(module, "cpu", dtype)


@TRAINING
@DTYPE
@SAMPLE
def test_factory_kwargs(torch_cls, index, dtype, training):
    sample = sample_of(torch_cls, index, dtype, False, training)
    kwargs = {**sample.constructor_input.kwargs, "device": "cpu", "dtype": dtype}
    module = FAST[torch_cls](*sample.constructor_input.args, **kwargs)
    module.train(training)
    assert_parameters_and_buffers_are(module, "cpu", dtype)


@TRAINING
@DTYPE
@SAMPLE
def test_repr(torch_cls, index, dtype, training):
    sample = sample_of(torch_cls, index, dtype, False, training)
    module = build(torch_cls, sample, dtype, training)
    module.__repr__()
    str(module)


@TRAINING
@DTYPE
@SAMPLE
def test_pickle(torch_cls, index, dtype, training):
    sample = sample_of(torch_cls, index, dtype, False, training)
    with freeze_rng_state():
        module = build(torch_cls, sample, dtype, training)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        output = module(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        copy = torch.load(buffer, weights_only=False)  # a whole module, not weights only
        torch.testing.assert_close(copy(*args, **kwargs), output)


@TRAINING
@DTYPE
@SAMPLE
def test_non_contiguous_tensors(torch_cls, index, dtype, training):
    sample = sample_of(torch_cls, index, dtype, True, training)

    def make_non_contiguous(obj):
        def inner(tensor):
            if tensor.dim() == 0:
                return tensor
            out = torch.repeat_interleave(tensor, 2, dim=-1)[..., ::2].detach()
            out.requires_grad = tensor.requires_grad
            return out
        return traverse(obj, inner)

    input_args, input_kwargs = sample.forward_input.args, sample.forward_input.kwargs
    module = build(torch_cls, sample, dtype, training)
    retain_grad((input_args, input_kwargs))

    def forward_backward(args, kwargs, grad_output):
        with freeze_rng_state():
            output = module(*args, **kwargs)
            flat_output = torch.utils._pytree.tree_flatten(output)[0]
            flat_grad = torch.utils._pytree.tree_flatten(grad_output)[0] if grad_output is not None else None
            if flat_grad is None:
                grad_output = tuple(traverse(o, lambda o: o.clone().detach_().normal_() if o.requires_grad else None)
                                    for o in output)
                flat_grad = torch.utils._pytree.tree_flatten(grad_output)[0]
            for o, g in zip(flat_output, flat_grad):
                if o.requires_grad:
                    o.backward(g, retain_graph=True)
        return output, grad_output

    default_output, grad_output = forward_backward(input_args, input_kwargs, None)
    default_args_grad, default_kwargs_grad = deepcopy(get_grads((input_args, input_kwargs)))
    default_param_grad = deepcopy([p.grad for p in module.parameters()])

    nc_args, nc_kwargs = make_non_contiguous((input_args, input_kwargs))
    nc_grad_output = make_non_contiguous(grad_output)
    for (args, kwargs), grads in product([(input_args, input_kwargs), (nc_args, nc_kwargs)],
                                         [grad_output, nc_grad_output]):
        zero_grad((args, kwargs))
        zero_grad(list(module.parameters()))
        output, _ = forward_backward(args, kwargs, deepcopy(grads))
        args_grad, kwargs_grad = get_grads((args, kwargs))
        torch.testing.assert_close(output, default_output)
        torch.testing.assert_close(args_grad, default_args_grad, atol=1e-4, rtol=0)
        torch.testing.assert_close(kwargs_grad, default_kwargs_grad, atol=1e-4, rtol=0)
        torch.testing.assert_close([p.grad for p in module.parameters()], default_param_grad)


def gradients_helper(torch_cls, index, training, check, partials=True):
    dtype = torch.float64
    sample = sample_of(torch_cls, index, dtype, True, training)
    if not (training or FULL or sample.constructor_input.kwargs.get("dropout")):
        pytest.skip("eval computes what train does (no dropout); BIRNN_FAST_MODULE_INFO=full runs it")
    module = build(torch_cls, sample, dtype, training)
    params = tuple(module.parameters())
    input_args, input_kwargs = sample.forward_input.args, sample.forward_input.kwargs
    other_kwargs = {name: obj for name, obj in input_kwargs.items() if not isinstance(obj, torch.Tensor)}
    kwarg_tensors = [(name, obj) for name, obj in input_kwargs.items() if isinstance(obj, torch.Tensor)]

    def fn_to_check(*flat_input_and_params):
        input_and_params = torch.utils._pytree.tree_unflatten(flat_input_and_params, flat_spec)
        new_args = input_and_params[:len(input_args)]
        kwarg_args = input_and_params[-len(kwarg_tensors):]
        new_kwargs = {name: obj for (name, _), obj in zip(kwarg_tensors, kwarg_args)}
        with freeze_rng_state():
            output = module(*new_args, **new_kwargs, **other_kwargs)
            return torch.utils._pytree.tree_flatten(output)[0]

    # The total derivative, then each parameter's partial one, as torch's _test_gradients_helper.
    grad_input = input_args + params + tuple(obj for _, obj in kwarg_tensors)
    flat_input, flat_spec = torch.utils._pytree.tree_flatten(grad_input)
    assert check(fn_to_check, flat_input, nondet_tol=0.0)
    if not partials:
        return
    old_requires_grad = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad = False
    for p, old in zip(params, old_requires_grad):
        p.requires_grad = old
        flat_input, flat_spec = torch.utils._pytree.tree_flatten(grad_input)
        assert check(fn_to_check, flat_input, nondet_tol=0.0)
        p.requires_grad = False


@TRAINING
@SAMPLE
def test_grad(torch_cls, index, training):
    gradients_helper(torch_cls, index, training, gradcheck)


@TRAINING
@SAMPLE
def test_gradgrad(torch_cls, index, training):
    assert INFOS[torch_cls].supports_gradgrad
    gradients_helper(torch_cls, index, training, gradgradcheck, partials=FULL)


@TRAINING
@DTYPE
@SAMPLE
def test_memory_format(torch_cls, index, dtype, training):
    """RNN inputs are 2-D or 3-D: only the contiguous format and preserve_format apply."""
    sample = sample_of(torch_cls, index, dtype, True, training)

    def req_grad(t):
        return isinstance(t, torch.Tensor) and t.requires_grad

    def check_contiguous(outputs):
        traverse(outputs, lambda t: None if t.is_contiguous() else pytest.fail("non-contiguous output"))

    with freeze_rng_state():
        module = build(torch_cls, sample, dtype, training)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        desired = module(*args, **kwargs)
        ref_diff_outputs = tuple(t for t in torch.utils._pytree.tree_flatten(desired)[0] if req_grad(t))
        params = tuple(module.parameters())
        ref_diff_inputs = tuple(t for t in torch.utils._pytree.tree_flatten((args, kwargs, params))[0] if req_grad(t))
        ref_grad_outputs = tuple(torch.rand_like(t) for t in ref_diff_outputs)
        if training:
            ref_grads = torch.autograd.grad(ref_diff_outputs, ref_diff_inputs, grad_outputs=ref_grad_outputs)
        d_args = traverse(args, lambda t: t.clone().contiguous().detach().requires_grad_(t.requires_grad))
        for module_format in (torch.preserve_format, torch.contiguous_format):
            module.to(memory_format=module_format)
            outputs = module(*d_args, **kwargs)
            torch.testing.assert_close(outputs, desired)
            check_contiguous(outputs)
            if training:
                diff_outputs = tuple(t for t in torch.utils._pytree.tree_flatten(outputs)[0] if req_grad(t))
                diff_inputs = tuple(t for t in torch.utils._pytree.tree_flatten((d_args, kwargs, params))[0]
                                    if req_grad(t))
                grads = torch.autograd.grad(diff_outputs, diff_inputs,
                                            grad_outputs=[torch.empty_like(a).copy_(b)
                                                          for a, b in zip(diff_outputs, ref_grad_outputs)])
                torch.testing.assert_close(grads, ref_grads)
                check_contiguous(grads)


@DTYPE
@SAMPLE
def test_if_train_and_eval_modes_differ(torch_cls, index, dtype):
    sample = sample_of(torch_cls, index, dtype, False, True)
    module = build(torch_cls, sample, dtype, True)
    delattr(module, "training")
    try:
        module(*sample.forward_input.args, **sample.forward_input.kwargs)
    except AttributeError as error:
        if "'training'" not in str(error):
            raise
        assert INFOS[torch_cls].train_and_eval_differ


@TRAINING
@DTYPE
@SAMPLE
def test_device_ctx_init(torch_cls, index, dtype, training):
    sample = sample_of(torch_cls, index, dtype, False, training)
    with torch.device("meta"):
        meta_sample = samples(torch_cls, dtype, False, training, device=None)[index]
    module_cpu = FAST[torch_cls](*sample.constructor_input.args, **sample.constructor_input.kwargs)
    with torch.device("meta"):
        module = FAST[torch_cls](*meta_sample.constructor_input.args, **meta_sample.constructor_input.kwargs)
    for meta, cpu in chain(zip(module.parameters(), module_cpu.parameters()), zip(module.buffers(), module_cpu.buffers())):
        assert meta.is_meta
        assert_metadata_eq(assert_equal, meta, cpu)


def assert_equal(a, b, msg=None):
    assert a == b, msg


def error_ids():
    cases = []
    for torch_cls in FAST:
        info = INFOS[torch_cls]
        for index, error in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                                    requires_grad=False, training=True)):
            cases.append(pytest.param(torch_cls, index, id=f"{torch_cls.__name__}-{index}-{error.error_regex[:40]}"))
    return cases


@TRAINING
@DTYPE
@pytest.mark.parametrize("torch_cls,index", error_ids())
def test_errors(torch_cls, index, dtype, training):
    info = INFOS[torch_cls]
    error = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                          training=training)[index]
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error.error_type, match=error.error_regex):
            FAST[torch_cls](*args, **kwargs)
    else:
        module = FAST[torch_cls](*args, **kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            module(*sample.forward_input.args, **sample.forward_input.kwargs)


@pytest.mark.gpu
@TRAINING
@DTYPE
@SAMPLE
def test_cpu_gpu_parity(torch_cls, index, dtype, training):
    """torch's tolerances for this check (5e-2 float32, 4e-4 float64), TF32 off."""
    tolerance = {torch.float32: 5e-2, torch.float64: 4e-4}[dtype]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        sample = sample_of(torch_cls, index, dtype, True, training)

        def to_device(obj):
            if isinstance(obj, torch.Tensor):
                return obj.detach().to("cuda").requires_grad_(obj.requires_grad)
            if isinstance(obj, tuple):
                return tuple(to_device(o) for o in obj)
            if isinstance(obj, dict):
                return {key: to_device(o) for key, o in obj.items()}
            return deepcopy(obj)

        cpu_args, cpu_kwargs = sample.forward_input.args, sample.forward_input.kwargs
        gpu_args, gpu_kwargs = to_device((cpu_args, cpu_kwargs))
        retain_grad((cpu_args, cpu_kwargs, gpu_args, gpu_kwargs))
        cpu_module = build(torch_cls, sample, dtype, training)
        gpu_module = build(torch_cls, sample, dtype, training, device="cuda")
        gpu_module.load_state_dict(cpu_module.state_dict())
        cpu_outputs, gpu_outputs = cpu_module(*cpu_args, **cpu_kwargs), gpu_module(*gpu_args, **gpu_kwargs)
        torch.testing.assert_close(gpu_outputs, cpu_outputs, atol=tolerance, rtol=0, check_device=False)
        flat_cpu, flat_gpu = (torch.utils._pytree.tree_flatten(o)[0] for o in (cpu_outputs, gpu_outputs))
        for cpu_output, gpu_output in zip(flat_cpu, flat_gpu):
            if cpu_output.requires_grad:
                grad = cpu_output.clone().normal_()
                cpu_output.backward(grad, retain_graph=True)
                gpu_output.backward(grad.to("cuda"), retain_graph=True)
        torch.testing.assert_close(get_grads(gpu_args), get_grads(cpu_args), atol=tolerance, rtol=0, check_device=False)
        for cpu_p, gpu_p in zip(cpu_module.parameters(), gpu_module.parameters()):
            torch.testing.assert_close(gpu_p.grad, cpu_p.grad, atol=tolerance, rtol=0, check_device=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
