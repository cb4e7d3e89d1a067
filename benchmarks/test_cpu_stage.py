"""The many-core CPU stage (benchmarks/cpu_stage.sh) as a device call runs it, here: with the library
recorded as built from these sources (`--record`, what `make cpu-stage-lib` does for the GPU image's
stack), it takes that library instead of building one, and writes its scaling table."""
import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = os.path.join(ROOT, "benchmarks", "cpu_stage.sh")


def test_cpu_stage_takes_the_recorded_library(tmp_path):
    library = os.path.join(ROOT, "birnn_fast", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    record = library + ".sources"
    previous = open(record).read() if os.path.exists(record) else None
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path), "CPU_STAGE_THREADS": "1,2",
           "CPU_STAGE_CASES": "sentiment-infer", "CPU_STAGE_BUDGET": "0.05"}
    subprocess.run(["bash", STAGE, "--record"], env=env, check=True, timeout=60)
    try:
        run = subprocess.run(["bash", STAGE], env=env, capture_output=True, text=True, timeout=600)
    finally:
        if previous is None:
            os.remove(record)
        else:
            with open(record, "w") as file:
                file.write(previous)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"the carried {os.path.relpath(library, ROOT)}" in run.stdout, run.stdout
    assert "sentiment-infer" in (tmp_path / "cpu_scaling.md").read_text()
