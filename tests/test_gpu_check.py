"""``benchmarks/gpu_check.sh --cpu-smoke`` runs for the current backend and prints its table.

The GPU check itself needs the GPU machine; the smoke mode runs the same code paths (device
report, DINO and iBOT+PQCL steps, both precisions, the table) with a tiny model on the CPU,
so the script cannot rot unnoticed.
"""

import os
import subprocess

import keras

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "gpu_check.sh")


def test_cpu_smoke_prints_a_row_per_method_and_precision():
    backend = keras.backend.backend()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", SCRIPT, "--cpu-smoke", "--backends", backend, "--budget-s", "280"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith(f"- {backend}: ") and "cpu" in line.lower() for line in lines), proc.stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith(f"| {backend} ")]
    assert [(r[1], r[4]) for r in rows] == [("DINO", "float32"), ("iBOT+PQCL", "mixed_bfloat16")], proc.stdout
    for r in rows:
        assert float(r[6]) > 0 and r[9] == "n/a"
