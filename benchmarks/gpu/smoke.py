"""The first stage of ``make gpu-check``: the environment, then the barrier's smoke test. A grid of
twice the SM count (programs too heavy to share an SM) must raise, not hang: launched cooperatively
the driver refuses it; launched without, the bounded barrier wait gives up and the launcher raises.
Then a grid that fits runs.

    python -m benchmarks.gpu.smoke [--self-test]
"""
import argparse
import os
import sys
import time

from benchmarks.gpu import cases


def inputs(torch, device, dtype, T, B, H):
    generator = torch.Generator().manual_seed(0)
    G = 4
    stacked = [(torch.randn(2, *shape, generator=generator) * H ** -0.5).to(device, dtype)
               for shape in ((G * H, H), (G * H, H), (G * H,), (G * H,))]
    x = torch.randn(T, B, H, generator=generator).to(device, dtype)
    h0 = torch.zeros(2, B, H, device=device, dtype=dtype)
    lengths = torch.full((B,), T, dtype=torch.int64, device=device)
    return x, stacked, h0, lengths


def expect_raise(label, fn):
    started = time.perf_counter()
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - any error (the driver's or ours) is the pass
        print(f"ok   {label}: raised after {time.perf_counter() - started:.1f} s: "
              f"{type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
        return 0
    print(f"FAIL {label}: returned without an error after {time.perf_counter() - started:.1f} s", flush=True)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-test", action="store_true", help="CPU, Triton interpreted, tiny sizes")
    args = parser.parse_args(argv)
    birnn_fast = cases.import_birnn_fast(interpret=args.self_test)
    import torch
    import triton

    from birnn_fast.kernels import config as kernel_config
    from birnn_fast.kernels import forward as kernel_forward

    device = torch.device("cpu" if args.self_test else "cuda")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, birnn_fast "
          f"{birnn_fast.__version__}, python {sys.version.split()[0]}")
    print(f"cooperative launch option known to this Triton: {kernel_config.cooperative_launch_supported()}; "
          f"fp32 dots: {kernel_config.fp32_precision()} (cuDNN RNN flag)")
    failures = 0
    if args.self_test:
        sys.path.insert(0, os.path.join(cases.ROOT, "tests"))
        from concurrent_interpreter import concurrent_programs

        T, B, H = 3, 4, 40
        x, stacked, h0, lengths = inputs(torch, device, torch.float32, T, B, H)
        config = kernel_config.select_config("LSTM", B, H, torch.float32, "ieee", 6, 227 * 1024, stream_tiles=())
        print(f"device: cpu (interpreted); a grid one program short: {config}")
        with concurrent_programs(held_back=1):
            failures += expect_raise("grid one program short", lambda: kernel_forward.forward(
                "LSTM", x, *stacked, h0, h0, lengths, config=config, max_polls=5000))
        with concurrent_programs():
            kernel_forward.forward("LSTM", x, *stacked, h0, h0, lengths, config=config)
        print("ok   a grid that fits ran")
        return failures
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    print(f"device: {torch.cuda.get_device_name(device)}, {sms} SMs, "
          f"{getattr(props, 'shared_memory_per_block_optin', 0) // 1024} KiB shared per block (opt-in), "
          f"capability {props.major}.{props.minor}")
    # H = 16 * SMs streamed in 16-unit slices: SMs programs per direction, 2 * SMs in all, each holding
    # 256 threads of 160+ registers, so one per SM.
    T, B, H = 8, 16, 16 * sms
    x, stacked, h0, lengths = inputs(torch, device, torch.bfloat16, T, B, H)
    too_big = kernel_config.Config(16, 16, kernel_config.STREAM_NK, kernel_config.STREAM_BK, False, n_hblocks=sms,
                                   n_bprog=1)
    failures += expect_raise(f"cooperative grid of {2 * sms} programs", lambda: (
        kernel_forward.forward("LSTM", x, *stacked, h0, h0, lengths, config=too_big), torch.cuda.synchronize()))
    options = kernel_config.launch_options

    def not_cooperative(config):
        return dict(options(config), launch_cooperative_grid=False)

    kernel_config.launch_options = not_cooperative
    try:
        failures += expect_raise(f"non-cooperative grid of {2 * sms} programs, bounded wait", lambda: (
            kernel_forward.forward("LSTM", x, *stacked, h0, h0, lengths, config=too_big, max_polls=1 << 16),
            torch.cuda.synchronize()))
    finally:
        kernel_config.launch_options = options
    try:
        torch.zeros(1, device=device).add_(1).item()
        T, B, H = 16, 16, 256
        x, stacked, h0, lengths = inputs(torch, device, torch.bfloat16, T, B, H)
        config = kernel_config.launch_config("LSTM", B, H, torch.bfloat16, device, False)
        kernel_forward.forward("LSTM", x, *stacked, h0, h0, lengths)
        torch.cuda.synchronize()
        print(f"ok   a grid that fits ran: {config}")
    except Exception as error:  # noqa: BLE001
        print(f"FAIL a grid that fits: {type(error).__name__}: {error}")
        failures += 1
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
