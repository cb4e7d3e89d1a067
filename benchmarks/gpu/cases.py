"""What the GPU benchmark runs: the grids of cases, their inputs, and the module pairs it times (cuDNN
nn.LSTM and FastBiLSTM with the same weights)."""
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

import torch

from benchmarks.gpu import timing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FULL_GRID = {"B": [1, 16, 64, 256], "T": [64, 512, 1024], "H": [128, 256, 512, 768, 1024],
             "dtypes": ["fp32", "fp16", "bf16"]}
QUICK_GRID = {"B": [16, 64], "T": [512], "H": [256, 512, 1024], "dtypes": ["fp32", "bf16"]}
SEED = 0


def grid(args):
    base = QUICK_GRID if args.quick else FULL_GRID
    batches, steps, hiddens = args.B or base["B"], args.T or base["T"], args.H or base["H"]
    dtypes = args.dtypes or base["dtypes"]
    # Dtypes innermost: a run cut short by the budget still covers every dtype on the shapes it did.
    return [(dtype, batch, step, hidden) for hidden in hiddens for batch in batches for step in steps for dtype in dtypes]


def import_birnn_fast(interpret=False):
    """birnn_fast from this checkout, with kernels/ as birnn_fast.kernels (setup.py's package_dir).
    interpret: run the kernels in Triton's interpreter (CPU tensors), set before triton is imported.

    The package must find its kernels while it is imported (backends.py loads them then): a
    birnn_fast on sys.path with a kernels/ beside its files (check.sh's layout, a wheel) is used as
    it is; else (a plain checkout, an editable install) the same layout is made of links under /tmp."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    if "birnn_fast" not in sys.modules:
        spec = importlib.util.find_spec("birnn_fast")
        if spec is None or not os.path.isdir(os.path.join(os.path.dirname(spec.origin), "kernels")):
            sys.path.insert(0, _linked_layout())
    import birnn_fast

    if not os.path.realpath(birnn_fast.__file__).startswith(ROOT):
        print(f"note: birnn_fast imported from {birnn_fast.__file__}, not from this checkout {ROOT}")
    import birnn_fast.kernels  # noqa: F401
    return birnn_fast


def _linked_layout():
    """A folder holding birnn_fast/: links to this checkout's birnn_fast/* and kernels/."""
    site = tempfile.mkdtemp(prefix="birnn_site.")
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    package = os.path.join(site, "birnn_fast")
    os.mkdir(package)
    source = os.path.join(ROOT, "birnn_fast")
    for name in os.listdir(source):
        if name != "kernels":
            os.symlink(os.path.join(source, name), os.path.join(package, name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(package, "kernels"))
    return site


def make_lengths(steps, batch):
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(max(1, steps // 4), steps + 1, (batch,), generator=generator)


def build_pair(birnn_fast, hidden, dtype):
    """cuDNN nn.LSTM and FastBiLSTM with the same weights (torch's init, seeded), I = H."""
    torch.manual_seed(SEED)
    reference = torch.nn.LSTM(hidden, hidden, bidirectional=True).to(timing.DEVICE, dtype)
    ours = birnn_fast.FastBiLSTM(hidden, hidden).to(timing.DEVICE, dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def packed_forward(module, x, lengths):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    output, _ = pad_packed_sequence(module(packed)[0], total_length=x.shape[0])
    return output


def cases_of(rows):
    """Rows grouped by case (dtype, B, T, H), modes together, skipping cases whose inputs did not fit."""
    groups = {}
    for row in rows:
        if row["cudnn"] != "oom" or row["ours"] != "oom":
            groups.setdefault((row["dtype"], row["B"], row["T"], row["H"]), []).append(row)
    return list(groups.values())
