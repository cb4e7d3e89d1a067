"""What every CPU benchmark result records about the machine it ran on: the CPU model, the ISA torch's
own kernels and oneDNN use (under this process's ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS /
ATEN_CPU_CAPABILITY), what birnn_fast's CPU engine runs, the torch version and the commit.
"""
import functools
import os
import re
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CEILINGS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def onednn_isa():
    """The ISA oneDNN reports for its first primitive (ONEDNN_VERBOSE), in a child under this environment."""
    script = "import torch; torch.nn.LSTM(4, 4, bidirectional=True)(torch.randn(2, 1, 4))"  # runs a oneDNN primitive
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"onednn_verbose,.*info,cpu,isa:(.*)", result.stdout)
    return match.group(1).strip() if match else "unknown"


def commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def engine():
    from birnn_fast import backends

    reason = backends.why_not("cpu", torch.device("cpu"), torch.float32)
    if reason:
        return reason
    try:
        return torch.ops.birnn_fast_cpu.engine_info()
    except (AttributeError, RuntimeError):  # a build from before engine_info
        return "unknown"


@functools.lru_cache(maxsize=None)
def machine_facts():
    facts = {"cpu": cpu_model(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "onednn_isa": onednn_isa(), "birnn_fast_cpu": engine(), "torch": torch.__version__,
             "commit": commit(), "threads": torch.get_num_threads()}
    facts.update({name: os.environ.get(name, "") for name in CEILINGS})
    return facts


def describe(facts):
    ceilings = " ".join(f"{name}={facts[name]}" for name in CEILINGS if facts.get(name))
    return (f"{facts['cpu']}; torch {facts['torch']} ({facts['torch_cpu_capability']}), oneDNN {facts['onednn_isa']}; "
            f"birnn_fast {facts['birnn_fast_cpu']}; commit {facts['commit']}; {facts['threads']} threads"
            + (f"; {ceilings}" if ceilings else ""))
