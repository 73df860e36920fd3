"""``keras-pqcl pretrain`` as 2 JAX or TensorFlow processes on localhost, end to end.

The commands the README gives for one host: JAX with ``--coordinator``/``--num-processes``/
``--process-id`` (``jax.distributed``, gloo on CPU), TensorFlow with ``TF_CONFIG``
(``MultiWorkerMirroredStrategy``, ring collectives). A tiny DINO trains 2 epochs of 2 steps
with the k-NN monitor on: every artefact is written once (by process 0), only process 0
prints, and a ``--resume`` with 2 processes continues the run to 3 epochs.

The run's log equals that of a one-process run launched beside it: the loss, and the
teacher entropy, which with the tiny recipe's BatchNorm head needs the statistics of the
global batch (JAX's one program over the global batch; TensorFlow's all-reduced
``BatchStatNorm``). Not in the torch leg (test_torchrun_cli.py).
"""

import json
import os
import sys

import keras
import pytest

from keras_pqcl.callbacks.checkpoint import list_checkpoints, load_latest_checkpoint
from keras_pqcl.callbacks.epoch_log import read_rows
from tests import multiprocess as mp

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(BACKEND == "torch", reason="torch: test_torchrun_cli.py")

# One run takes 30-70 s on 2 idle cores; past this a process is stuck.
TIMEOUT = 300
PRETRAIN = [sys.executable, "-m", "keras_pqcl.cli"]


def launch(output, epochs, *args, reference=None):
    """``[(exit code, output)]`` of the 2 processes of the README's one-host launch (and of a
    one-process run into ``reference``, when given, started beside them)."""
    command = [*PRETRAIN, *mp.tiny_pretrain(output, epochs), *args]
    if BACKEND == "jax":
        port = mp.free_port()
        runs = [
            ([*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], {})
            for i in range(2)
        ]
    else:
        workers = [f"127.0.0.1:{mp.free_port()}" for _ in range(2)]
        configs = [{"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}} for i in range(2)]
        runs = [(command, {"TF_CONFIG": json.dumps(config)}) for config in configs]
    if reference is not None:
        runs.append(([*PRETRAIN, *mp.tiny_pretrain(reference, epochs), *args], {}))
    return mp.launch_together([(c, mp.env(BACKEND, TF_CPP_MIN_LOG_LEVEL="2", **e)) for c, e in runs], timeout=TIMEOUT)


def _names(paths):
    return [os.path.basename(p) for p in paths]


def test_two_processes_write_once_and_resume(tmp_path):
    output, reference = tmp_path / "run", tmp_path / "reference"
    results = launch(output, 2, "--knn-every", "1", reference=reference)
    for code, out in results:
        assert code == 0, out[-6000:]
    chief, other = results[0][1], results[1][1]
    assert chief.count("keras-pqcl: recipe 'tiny'") == 1 and chief.count("\nDone.") == 1, chief[-6000:]
    # Process 1 prints no banner, progress or summary.
    assert "keras-pqcl" not in other and "Done." not in other and "Epoch 1/2" not in other, other[-6000:]
    rows = read_rows(output / "log.csv")
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert all(float(row["knn_top1"]) > 0 for row in rows)  # the chief's k-NN, on its own copy
    checkpoints = output / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-e00001-s0000000.keras", "checkpoint-e00002-s0000000.keras"]
    for name in ("summary.json", "recipe.json", "loss.png", "teacher_backbone.keras", "student_backbone.keras"):
        assert (output / name).is_file(), name
    mp.assert_same_log(rows, read_rows(reference / "log.csv"))

    results = launch(output, 3, "--knn-every", "0", "--resume")
    for code, out in results:
        assert code == 0, out[-6000:]
    assert results[0][1].count("keras-pqcl: resuming from") == 1, results[0][1][-6000:]
    assert [row["epoch"] for row in read_rows(output / "log.csv")] == ["0", "1", "2"]
    assert _names(list_checkpoints(checkpoints))[0] == "checkpoint-e00003-s0000000.keras"
    model, progress = load_latest_checkpoint(str(checkpoints))
    assert (progress.epoch, progress.step) == (3, 0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3 * 2


def test_a_batch_the_processes_cannot_share_is_one_line_in_each(tmp_path):
    results = launch(tmp_path / "run", 1, "--batch-size", "9")
    for code, out in results:
        assert code == 2, out[-6000:]
        errors = [line for line in out.splitlines() if line.startswith("keras-pqcl: error:")]
        assert errors == [
            "keras-pqcl: error: --batch-size 9 is the global batch of all 2 processes and does not divide by 2; "
            "pass a multiple of 2 (e.g. 8)."
        ], out[-6000:]
        assert "Traceback" not in out, out[-6000:]
    assert not (tmp_path / "run").exists()
