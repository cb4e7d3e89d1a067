"""Where a forward step's time goes: the TIMING build of the forward kernel (kernels/forward.py) at the
launcher's own configuration, its %globaltimer stamps turned into a phase table (median over the
programs and the steps after the first few, in microseconds), next to the default build's time per
step. A device-check stage (check.sh); ``--self-test`` runs its host code on a made-up buffer.

Phases (first round of a step; later rounds of a multi-round step fall into "stores, later rounds"):
wait (barrier), load h, products, gate math, exchange store, later rounds + arrive, other stores.
The stamps cost a reduction each: their sum exceeds the default build's step. The variants of
STAMPED_VARIANTS change where a step waits, so their TIMING builds get a row too (the step-tagged
exchange: no barrier wait nor arrive, the wait for the other programs' h is in "load h").
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


def run_case(birnn_fast, dtype_key, batch, hidden, steps, args):
    from birnn_fast.kernels import config as kernels_config
    from birnn_fast.kernels import forward as kernels_forward

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
    config = kernels_config.launch_config("LSTM", batch, hidden, dtype, device, backward=False)

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-test", action="store_true", help="the host code on a made-up buffer (no GPU)")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--append", help="also append the table to this markdown report")
    args = parser.parse_args(argv)
    def emit(line):
        """Printed and appended as it comes: a stage killed by its limit keeps its rows."""
        print(line, flush=True)
        if args.append:
            with open(args.append, "a") as report:
                report.write(line + "\n")

    from birnn_fast.kernels import forward as kernels_forward

    variants = sorted(kernels_forward.VARIANTS)
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
            shape = (f"{'resident' if config.RESIDENT else 'streamed'} BB{config.BB} BH{config.BH} "
                     f"{config.n_hblocks}x{config.n_bprog}{' fused' if config.FUSED else ''}")
            for build, table in tables.items():
                cells = ["n/a" if table is None else f"{table[name]:.2f}" for name in ["step"] + NAMES]
                if build == "default":
                    cells += [per_step(variant_ms[name], args.steps) for name in sorted(variant_ms)]
                    label, step = "", per_step(default_ms, args.steps)
                else:
                    cells += ["-"] * len(variant_ms)
                    label, step = f" ({build})", per_step(variant_ms[build], args.steps)
                emit(f"| {dtype_key} B={batch} H={hidden}{label} | {shape} | {step} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
