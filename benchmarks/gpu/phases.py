"""Where a forward step's time goes: the TIMING build of the forward kernel (kernels/forward.py) at the
launcher's own configuration, its %globaltimer stamps turned into a phase table (median over the
programs and the steps after the first few, in microseconds), next to the default build's time per
step. A device-check stage (check.sh); ``--self-test`` runs its host code on a made-up buffer.

Phases (first round of a step; later rounds of a multi-round step fall into "stores, later rounds"):
wait (barrier), load h, products, gate math, exchange store, later rounds + arrive, other stores.
The stamps cost a reduction each: their sum exceeds the default build's step. The variants of
STAMPED_VARIANTS change where a step waits, so their TIMING builds get a row too (the step-tagged
exchange: no barrier wait nor arrive, the wait for the other programs' h is in "load h").

Then the backward kernel's variants (kernels/backward.py VARIANTS: the step-tagged exchange of the gate
gradients) against its default, same cases, each bitwise-compared first: a table of its own, after the
forward's, so that a stage cut short by its limit keeps the forward's rows.
"""
import argparse
import os
import sys

import torch

from benchmarks.gpu import cases, timing

CASES = [("bf16", 16, 512), ("bf16", 64, 512), ("bf16", 16, 1024), ("fp32", 16, 1024)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = ["wait", "load h", "products", "gate math", "exchange store", "later rounds + arrive", "other stores"]
SKIP_STEPS = 4
STAMPED_VARIANTS = ("tagged_exchange",)


def phase_table(stamps, lengths_steps):
    """Median microseconds of each phase and of the whole step, from a timing buffer (2, n_bprog,
    n_hblocks, T, 8) of ns stamps (-1: not written)."""
    stamps = stamps[..., SKIP_STEPS:lengths_steps, :].reshape(-1, stamps.shape[-1]).double()
    stamps = stamps[(stamps >= 0).all(dim=1)]
    if stamps.numel() == 0:
        return None
    deltas = (stamps[:, 1:] - stamps[:, :-1]) / 1e3
    medians = deltas.median(dim=0).values.tolist()
    step = ((stamps[:, -1] - stamps[:, 0]) / 1e3).median().item()
    return dict(zip(NAMES, medians), step=step)


def per_step(ms, steps):
    """Microseconds per step of a launch's median ms, or the reason it has none."""
    return f"{ms * 1e3 / steps:.2f}" if isinstance(ms, float) else str(ms)


def case_inputs(dtype_key, batch, hidden, steps):
    """An LSTM layer's launcher arguments (I = H, every row T steps): x, w_ih, w_hh, bias, h0, lengths."""
    dtype = DTYPES[dtype_key]
    device = torch.device(timing.DEVICE)
    torch.manual_seed(0)
    G = 4
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    w_ih = torch.randn(2, G * hidden, hidden, device=device, dtype=dtype) * hidden ** -0.5
    w_hh = torch.randn(2, G * hidden, hidden, device=device, dtype=dtype) * hidden ** -0.5
    bias = torch.zeros(2, G * hidden, device=device, dtype=dtype)
    h0 = torch.zeros(2, batch, hidden, device=device, dtype=dtype)
    lengths = torch.full((batch,), steps, device=device, dtype=torch.int64)
    return x, w_ih, w_hh, bias, h0, lengths


def run_case(birnn_fast, dtype_key, batch, hidden, steps, args):
    from birnn_fast.kernels import config as kernels_config
    from birnn_fast.kernels import forward as kernels_forward

    device = torch.device(timing.DEVICE)
    x, w_ih, w_hh, bias, h0, lengths = case_inputs(dtype_key, batch, hidden, steps)
    config = kernels_config.launch_config("LSTM", batch, hidden, x.dtype, device, backward=False)

    def launch(buffer=None, variants=()):
        return kernels_forward.forward("LSTM", x, w_ih, w_hh, bias, bias, h0, h0, lengths, False, config=config,
                                       timing=buffer, variants=variants)

    default_ms = timing.measure(f"{dtype_key} B={batch} H={hidden} default", launch, args)
    expected = launch()
    for name in sorted(kernels_forward.VARIANTS):
        # A variant must compute what the default does, bit for bit, before its time counts.
        actual = launch(variants=(name,))
        if not all(torch.equal(a, b) for a, b in zip(actual, expected)):
            raise RuntimeError(f"variant {name} differs from the default build at {dtype_key} B={batch} H={hidden}")
    variant_ms = {name: timing.measure(f"{dtype_key} B={batch} H={hidden} {name}",
                                       lambda name=name: launch(variants=(name,)), args)
                  for name in sorted(kernels_forward.VARIANTS)}
    tables = {}
    for variants in [()] + [(name,) for name in STAMPED_VARIANTS]:
        buffer = kernels_forward.timing_buffer(config, steps, device)
        launch(buffer, variants)  # compiles the TIMING build
        buffer.fill_(-1)
        launch(buffer, variants)
        timing.synchronize()
        tables[variants[0] if variants else "default"] = phase_table(buffer.cpu(), steps)
    return config, default_ms, variant_ms, tables


def run_backward_case(dtype_key, batch, hidden, steps, args):
    """(config, the backward's default ms, {variant: ms}) at the launcher's own configuration: the
    backward of one forward's results and a fixed random cotangent; each variant bitwise-compared with
    the default before it is timed."""
    from birnn_fast.kernels import backward as kernels_backward
    from birnn_fast.kernels import config as kernels_config
    from birnn_fast.kernels import forward as kernels_forward

    device = torch.device(timing.DEVICE)
    x, w_ih, w_hh, bias, h0, lengths = case_inputs(dtype_key, batch, hidden, steps)
    output, _, _, workspace = kernels_forward.forward("LSTM", x, w_ih, w_hh, bias, bias, h0, h0, lengths)
    grad_output = torch.randn_like(output)
    grad_n = torch.randn_like(h0)
    config = kernels_config.launch_config("LSTM", batch, hidden, x.dtype, device, backward=True)

    def launch(variants=()):
        return kernels_backward.backward("LSTM", grad_output, grad_n, grad_n, x, w_ih, w_hh, bias, h0, h0, lengths,
                                         output, workspace, config=config, variants=variants)

    default_ms = timing.measure(f"{dtype_key} B={batch} H={hidden} backward default", launch, args)
    expected = launch()
    for name in sorted(kernels_backward.VARIANTS):
        actual = launch(variants=(name,))
        if not all(torch.equal(a, b) for a, b in zip(actual, expected)):
            raise RuntimeError(f"backward variant {name} differs from the default build at {dtype_key} B={batch} "
                               f"H={hidden}")
    variant_ms = {name: timing.measure(f"{dtype_key} B={batch} H={hidden} backward {name}",
                                       lambda name=name: launch(variants=(name,)), args)
                  for name in sorted(kernels_backward.VARIANTS)}
    return config, default_ms, variant_ms


def config_shape(config):
    return (f"{'resident' if config.RESIDENT else 'streamed'} BB{config.BB} BH{config.BH} "
            f"{config.n_hblocks}x{config.n_bprog}{' fused' if config.FUSED else ''}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-test", action="store_true",
                        help="the host code on a made-up buffer, the backward's on a tiny case interpreted (no GPU)")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--append", help="also append the table to this markdown report")
    args = parser.parse_args(argv)
    def emit(line):
        """Printed and appended as it comes: a stage killed by its limit keeps its rows."""
        print(line, flush=True)
        if args.append:
            with open(args.append, "a") as report:
                report.write(line + "\n")

    if args.self_test:
        timing.DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # read by Triton at import: set before anything imports it
    from birnn_fast.kernels import backward as kernels_backward
    from birnn_fast.kernels import forward as kernels_forward

    variants = sorted(kernels_forward.VARIANTS)
    backward_variants = sorted(kernels_backward.VARIANTS)
    backward_lines = [f"\n## Backward step (us per step, T={args.steps}): the default build and each of "
                      "kernels/backward.py VARIANTS, bitwise-compared first\n",
                      "| case | config | default step | " + " | ".join(f"{name} step" for name in backward_variants)
                      + " |", "|---|---|---:|" + "---:|" * len(backward_variants)]
    lines = [f"\n## Forward step phases, TIMING build (median us; T={args.steps}, first round of each step; "
             "the default build's step beside, and each variant's: kernels/forward.py VARIANTS)\n",
             "| case | config | default step | stamped step | " + " | ".join(NAMES + [f"{name} step" for name in variants])
             + " |", "|---|---|---:|---:|" + "---:|" * (len(NAMES) + len(variants))]
    for line in lines:
        emit(line)
    if args.self_test:
        generator = torch.Generator().manual_seed(0)
        stamps = torch.cumsum(torch.randint(100, 2000, (2, 1, 2, 12, 8), generator=generator), dim=-1)
        stamps[..., 1:, :] += stamps[..., :-1, -1:].cumsum(dim=-2)
        table = phase_table(stamps, 12)
        assert table is not None and all(value > 0 for value in table.values()), table
        emit("| self-test | - | - | " + f"{table['step']:.2f} | " + " | ".join(f"{table[name]:.2f}" for name in NAMES)
             + " | -" * len(variants) + " |")
        for line in backward_lines:
            emit(line)
        tiny = argparse.Namespace(warmup_ms=0.0, rep_ms=0.0, verbose=True)
        config, default_ms, variant_ms = run_backward_case("bf16", 3, 16, 4, tiny)  # interpreted
        assert isinstance(default_ms, float) and all(isinstance(ms, float) for ms in variant_ms.values()), variant_ms
        emit(f"| self-test bf16 B=3 H=16 T=4 | {config_shape(config)} | {per_step(default_ms, 4)} | "
             + " | ".join(per_step(variant_ms[name], 4) for name in backward_variants) + " |")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 2
        birnn_fast = cases.import_birnn_fast()
        timing_args = argparse.Namespace(warmup_ms=10.0, rep_ms=40.0, verbose=True)
        for dtype_key, batch, hidden in CASES:
            try:
                config, default_ms, variant_ms, tables = run_case(birnn_fast, dtype_key, batch, hidden, args.steps,
                                                                  timing_args)
            except Exception as error:  # noqa: BLE001 - one failing case must not end the stage
                emit(f"| {dtype_key} B={batch} H={hidden} | failed: {timing.describe(error)} |")
                continue
            shape = config_shape(config)
            for build, table in tables.items():
                cells = ["n/a" if table is None else f"{table[name]:.2f}" for name in ["step"] + NAMES]
                if build == "default":
                    cells += [per_step(variant_ms[name], args.steps) for name in sorted(variant_ms)]
                    label, step = "", per_step(default_ms, args.steps)
                else:
                    cells += ["-"] * len(variant_ms)
                    label, step = f" ({build})", per_step(variant_ms[build], args.steps)
                emit(f"| {dtype_key} B={batch} H={hidden}{label} | {shape} | {step} | " + " | ".join(cells) + " |")
        for line in backward_lines:
            emit(line)
        for dtype_key, batch, hidden in CASES:
            try:
                config, default_ms, variant_ms = run_backward_case(dtype_key, batch, hidden, args.steps, timing_args)
            except Exception as error:  # noqa: BLE001 - one failing case must not end the stage
                emit(f"| {dtype_key} B={batch} H={hidden} | failed: {timing.describe(error)} |")
                continue
            emit(f"| {dtype_key} B={batch} H={hidden} | {config_shape(config)} | {per_step(default_ms, args.steps)} | "
                 + " | ".join(per_step(variant_ms[name], args.steps) for name in backward_variants) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
