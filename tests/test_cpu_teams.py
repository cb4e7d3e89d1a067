"""Thread teams (csrc/cpu/team.h): with more threads than directions, each direction's recurrence
runs on a team that splits the hidden units. At 1, 2, 3, 4 and 8 threads (on a 2-core machine the
larger teams are oversubscribed: this checks correctness, not speed), every cell, lengths equal and
mixed, the team the shape picks and the largest one, with the directions at once and in turn:
forward and every gradient as torch's in float64, bitwise equal run to run in float32, bfloat16
within twice torch's own error. A projected LSTM runs without teams; it is here to show that the
other path still runs at these counts."""
import glob
import os
import subprocess
import sys

import pytest
import torch

from test_cpu_kernel import CASES, assert_all_close, make_layer, precision_errors, run_ops, run_torch

THREADS = [1, 2, 3, 4, 8]
GATES = {"LSTM": 4, "GRU": 3}
LENGTHS = {"equal": None, "mixed": [11, 1, 6, 11, 9, 3, 11]}
# H 44: slices of 8 units leave a short last one; T 11, B 7, I 13.
SIZE = (11, 7, 13, 44)
# BIRNN_FAST_CPU_TEAM / BIRNN_FAST_CPU_IN_TURN of each team a test asks for ("shape": the rule's).
TEAMS = {"shape": {}, "largest": {"BIRNN_FAST_CPU_TEAM": "64", "BIRNN_FAST_CPU_IN_TURN": "0"},
         "largest-in-turn": {"BIRNN_FAST_CPU_TEAM": "64", "BIRNN_FAST_CPU_IN_TURN": "1"}}


def set_team(monkeypatch, team):
    for name, value in TEAMS[team].items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("team", list(TEAMS))
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("cell,proj", CASES)
@pytest.mark.parametrize("threads", THREADS, indirect=True)
def test_matches_torch_fp64(monkeypatch, threads, cell, proj, lengths, team):
    set_team(monkeypatch, team)
    layer = make_layer(cell, *SIZE, proj, LENGTHS[lengths], seed=threads)
    assert_all_close(cell, proj, run_ops(cell, layer), run_torch(cell, layer), 1e-9)


@pytest.mark.parametrize("team", ["largest", "largest-in-turn"])
@pytest.mark.parametrize("cell,proj", CASES)
@pytest.mark.parametrize("threads", [2, 3, 8], indirect=True)
def test_bitwise_deterministic_fp32(monkeypatch, threads, cell, proj, team):
    set_team(monkeypatch, team)
    layer = {key: ([w.float() for w in value] if key == "weights" else value if key == "lengths" else value.float())
             for key, value in make_layer(cell, *SIZE, proj, LENGTHS["mixed"]).items()}
    first, second = run_ops(cell, layer), run_ops(cell, layer)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("team", ["largest", "largest-in-turn"])
@pytest.mark.parametrize("cell,proj", [case for case in CASES if case[0] != "RNN_RELU"])
@pytest.mark.parametrize("threads", [4], indirect=True)
def test_bfloat16_within_twice_torch(monkeypatch, threads, cell, proj, team):
    set_team(monkeypatch, team)
    for name, (ours, theirs) in precision_errors(cell, proj, torch.bfloat16, LENGTHS["mixed"][:6],
                                                 size=(11, 6, 13, 44)).items():
        assert ours <= 2 * theirs + 1e-6, f"{name}: our error {ours:.3g} > 2 x torch's {theirs:.3g}"


@pytest.mark.parametrize("threads", [4], indirect=True)
def test_shape_picks_a_team_for_a_wide_layer(threads):
    """B 16, H 256 LSTM at 4 threads: 2 members a direction. Compared with torch in float32."""
    layer = make_layer("LSTM", 5, 16, 8, 256, 0, None)
    layer32 = {key: ([w.float() for w in value] if key == "weights" else value if key == "lengths" else value.float())
               for key, value in layer.items()}
    assert_all_close("LSTM", 0, run_ops("LSTM", layer32), run_torch("LSTM", layer), 1e-5)


def last_level_cache_bytes():
    """The last-level cache instance cpu0 shares, as team.h reads it (sysfs), or None."""
    level, size = 0, None
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        with open(f"{index}/level") as lf, open(f"{index}/type") as tf, open(f"{index}/size") as sf:
            this_level, kind, text = int(lf.read()), tf.read().strip(), sf.read().strip()
        if kind != "Instruction" and this_level > level:
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            level, size = this_level, int(text.rstrip("KM")) * scale
    return size


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_shape_runs_wide_weights_in_turn(monkeypatch, threads, cell):
    """H 1024 at 2 threads, B 2: the rule runs the directions in turn where both directions' float32
    W_hh (2 x 12-16 MiB) take more than half the last-level cache, at once elsewhere. Which path ran
    shows in the bits: the rule's float32 results equal those of the path it should take, forced, and
    differ from the other's; in float64 they match torch."""
    layer = make_layer(cell, 3, 2, 8, 1024, 0, [3, 2])
    assert_all_close(cell, 0, run_ops(cell, layer), run_torch(cell, layer), 1e-9)
    cache = last_level_cache_bytes()
    if cache is None:
        pytest.skip("no cache sizes in sysfs")
    layer32 = {key: ([w.float() for w in value] if key == "weights" else value if key == "lengths" else value.float())
               for key, value in layer.items()}
    results = {"rule": run_ops(cell, layer32)}
    for forced in ("0", "1"):
        monkeypatch.setenv("BIRNN_FAST_CPU_IN_TURN", forced)
        results[forced] = run_ops(cell, layer32)
    expected = "1" if 2 * GATES[cell] * 1024 * 1024 * 4 > cache // 2 else "0"
    other = "0" if expected == "1" else "1"
    assert all(torch.equal(a, b) for a, b in zip(results["rule"], results[expected]))
    assert not all(torch.equal(a, b) for a, b in zip(results["rule"], results[other]))


def run_fresh(code, **environment):
    """`code` in a fresh process on the cpu backend, from the checkout's root, with `environment` set."""
    env = dict(os.environ, BIRNN_FAST_BACKEND="cpu", **environment)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("in_turn,limit", [("0", "3"), ("1", "1")])
def test_teams_shrink_to_the_threads_openmp_starts(in_turn, limit):
    """A forced team of 4 under 8 threads, OpenMP capped: at once with OMP_THREAD_LIMIT=3 the teams
    shrink to one member each, in turn with OMP_THREAD_LIMIT=1 to one thread (a member waiting for
    one that never starts would hang)."""
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); torch.set_num_threads(8)\n"
        "from test_cpu_kernel import make_layer, run_ops, run_torch, assert_all_close\n"
        "layer = make_layer('GRU', 11, 7, 13, 44, 0, [11, 1, 6, 11, 9, 3, 11])\n"
        "assert_all_close('GRU', 0, run_ops('GRU', layer), run_torch('GRU', layer), 1e-9)\n"
        "print('ok')\n")
    result = run_fresh(code, OMP_THREAD_LIMIT=limit, BIRNN_FAST_CPU_TEAM="4", BIRNN_FAST_CPU_IN_TURN=in_turn)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_half_products_in_teams():
    """A bfloat16 / float16 layer's own dtype in the products (BIRNN_FAST_CPU_HALF_PRODUCTS=brgemm, the
    path AVX512-BF16 / AMX CPUs take by default) on teams of 2 at 4 threads: each member's slices of
    W_hh in the dtype. Within twice torch's own error; a fresh process, as the backend is chosen once."""
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); torch.set_num_threads(4)\n"
        "from test_cpu_kernel import precision_errors\n"
        "for cell in ('LSTM', 'GRU', 'RNN_TANH'):\n"
        "    for dtype in (torch.bfloat16, torch.float16):\n"
        "        for name, (ours, theirs) in precision_errors(cell, 0, dtype, [11, 1, 6, 11, 9, 3],\n"
        "                                                     size=(11, 6, 13, 44)).items():\n"
        "            assert ours <= 2 * theirs + 1e-6, (cell, dtype, name, ours, theirs)\n"
        "print(torch.ops.birnn_fast_cpu.engine_info())\n")
    result = run_fresh(code, BIRNN_FAST_CPU_HALF_PRODUCTS="brgemm", BIRNN_FAST_CPU_TEAM="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "products.bfloat16=brgemm" in result.stdout
