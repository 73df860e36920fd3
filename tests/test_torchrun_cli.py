"""``keras-pqcl pretrain`` as 2 ``torchrun`` processes (gloo, CPU), end to end.

The command the README gives for one host trains a tiny DINO for 2 epochs of 2 steps: every
artefact is written once (by process 0), only process 0 prints, the log equals a one-process
run's (the BatchNorm of the head on the global batch), a ``--resume`` with 2
processes continues the same run to 3 epochs, and one process without torchrun to 4. A 2-process
run killed (SIGKILL) after a mid-epoch checkpoint and resumed ends equal to an uninterrupted
2-process run. A global batch the processes cannot share stops both with the one-line error.
Only in the KERAS_BACKEND=torch leg.
"""

import os
import re
import sys

import keras
import pytest

from keras_pqcl.callbacks.checkpoint import list_checkpoints, load_latest_checkpoint
from keras_pqcl.callbacks.epoch_log import read_rows
from tests import multiprocess as mp
from tests.test_resume import SCRIPT as KILLABLE
from tests.test_resume import assert_same_run

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torchrun: only in the KERAS_BACKEND=torch leg"
)

# One launch takes about 30 s on 2 idle cores; past this a process is stuck.
TIMEOUT = 240


def one_process(output, epochs, *args):
    """``(exit code, output)`` of the tiny run as one process, without torchrun."""
    command = [sys.executable, "-m", "keras_pqcl.cli", *mp.tiny_pretrain(output, epochs), "--knn-every", "0", *args]
    return mp.launch(command, mp.env("torch"), timeout=TIMEOUT)


def torchrun(output, *args, batch_size=8, epochs=2):
    """``(exit code, output)`` of the README's one-host command with ``args`` appended."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(mp.free_port()), "-m", "keras_pqcl.cli"]
    command += [*mp.tiny_pretrain(output, epochs, batch_size), "--knn-every", "0", *args]
    return mp.launch(command, mp.env("torch", TF_CPP_MIN_LOG_LEVEL="2"), timeout=TIMEOUT)


def _names(paths):
    return [os.path.basename(p) for p in paths]


def test_two_processes_write_once_and_resume(tmp_path):
    output = tmp_path / "run"
    code, out = torchrun(output)
    assert code == 0, out[-6000:]
    # Process 1 prints nothing: the banner and the summary appear once.
    assert out.count("keras-pqcl: recipe 'tiny'") == 1 and out.count("\nDone.") == 1, out[-6000:]
    assert [row["epoch"] for row in read_rows(output / "log.csv")] == ["0", "1"]
    checkpoints = output / "checkpoints"
    assert _names(list_checkpoints(checkpoints)) == [
        "checkpoint-e00002-s0000000.keras",
        "checkpoint-e00001-s0000000.keras",
    ]
    assert sorted(os.listdir(checkpoints)) == sorted(_names(list_checkpoints(checkpoints)))
    for name in ("summary.json", "recipe.json", "loss.png", "teacher_backbone.keras", "student_backbone.keras"):
        assert (output / name).is_file(), name
    # One process, the same global batch: the same run, the BatchNorm of the head included.
    reference = tmp_path / "reference"
    code, out = one_process(reference, 2)
    assert code == 0, out[-6000:]
    mp.assert_same_log(read_rows(output / "log.csv"), read_rows(reference / "log.csv"))

    code, out = torchrun(output, "--resume", epochs=3)
    assert code == 0, out[-6000:]
    assert out.count("keras-pqcl: resuming from") == 1, out[-6000:]
    assert [row["epoch"] for row in read_rows(output / "log.csv")] == ["0", "1", "2"]
    assert _names(list_checkpoints(checkpoints)) == [
        "checkpoint-e00003-s0000000.keras",
        "checkpoint-e00002-s0000000.keras",
    ]
    # Loading checks that the optimizer's step count matches the recorded progress.
    model, progress = load_latest_checkpoint(str(checkpoints))
    assert (progress.epoch, progress.step) == (3, 0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3 * 2

    # Another world size resumes the same run: --batch-size is the global batch, so the batches,
    # the step count and the schedules carry over. Here one process, without torchrun.
    code, out = one_process(output, 4, "--resume")
    assert code == 0 and "keras-pqcl: resuming from" in out, out[-6000:]
    assert [row["epoch"] for row in read_rows(output / "log.csv")] == ["0", "1", "2", "3"]
    model, progress = load_latest_checkpoint(str(checkpoints))
    assert (progress.epoch, progress.step) == (4, 0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4 * 2


def test_two_processes_killed_mid_epoch_resume_to_the_uninterrupted_run(tmp_path):
    # tests/scripts/killable_run.py: 3 epochs of 4 steps, a checkpoint every 3 steps. Each
    # process kills itself after its 4th step, so the newest checkpoint is the mid-epoch one of
    # step 3: the resumed processes restore weights, optimizer, teacher, random generators and
    # each one's position in its own shard of the data.
    def run(output, kill, *args):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--master_port", str(mp.free_port()), KILLABLE, str(output), kill, *args]
        return mp.launch(command, mp.env("torch", TF_CPP_MIN_LOG_LEVEL="2"), timeout=TIMEOUT)

    reference, resumed = tmp_path / "reference" / "run", tmp_path / "resumed" / "run"
    for path in (reference, resumed):
        path.parent.mkdir()
    code, out = run(reference, "-")
    assert code == 0, out[-6000:]

    code, out = run(resumed, "step:4")
    assert code != 0, out[-6000:]
    _, progress = load_latest_checkpoint(str(resumed / "checkpoints"))
    assert (progress.epoch, progress.step) == (0, 3)
    code, out = run(resumed, "-", "--resume")
    assert code == 0, out[-6000:]
    assert_same_run(str(resumed), str(reference))


def test_a_batch_the_processes_cannot_share_is_one_line(tmp_path):
    code, out = torchrun(tmp_path / "run", batch_size=9)
    assert code != 0
    errors = [line for line in out.splitlines() if line.startswith("keras-pqcl: error:")]
    assert errors, out[-6000:]
    assert set(errors) == {
        "keras-pqcl: error: --batch-size 9 is the global batch of all 2 processes and does not divide by 2; "
        "pass a multiple of 2 (e.g. 8)."
    }
    # No traceback from the training processes (torchrun prints its own report of the failure).
    assert not re.search(r'File "[^"]*keras_pqcl', out), out[-6000:]
    assert not (tmp_path / "run").exists()


def test_mcl_and_odd_batches_are_refused_before_anything_is_built():
    from keras_pqcl.processes import check
    from keras_pqcl.recipe import load_recipe
    from keras_pqcl.training import METHODS

    def check_recipe(recipe, count):
        check(recipe, METHODS[recipe.method].needs(recipe), count)

    with pytest.raises(ValueError, match=r"MCL.*cannot run as 2 processes; run it as one process") as error:
        check_recipe(load_recipe("mcl_resnet50"), 2)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"--batch-size 6 .* 4 processes .* multiple of 4 \(e\.g\. 4\)"):
        check_recipe(load_recipe("tiny").replace(batch_size=6), 4)
    check_recipe(load_recipe("tiny").replace(batch_size=8), 4)
