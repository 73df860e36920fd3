"""Fault injection: a run killed with SIGKILL at many points and resumed each time ends
exactly where an uninterrupted run ends (log and weights), on the backend under test.

Each run is a subprocess of ``tests/scripts/killable_run.py`` (a 3-epoch, 4-step tiny DINO
with stochastic depth, a checkpoint every 3 steps, so some fall mid-epoch, and a k-NN
evaluation). The chain of kills below covers: before any checkpoint, mid-step at a random
time, inside a checkpoint write (a temporary left behind), right after a checkpoint lands
(before pruning), between an epoch's log row and its checkpoint, during the k-NN
evaluation, and resuming from mid-epoch checkpoints (the whole chain on PyTorch; on
TensorFlow and JAX the kills that resume the backend's state, see ``BACKEND_CHAIN``).
"""

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_pqcl  # noqa: F401  (registers the classes the saved files need)
from keras_pqcl import cli
from keras_pqcl.callbacks.checkpoint import list_checkpoints
from keras_pqcl.callbacks.epoch_log import read_rows
from keras_pqcl.run_folder import RunFolder

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "scripts", "killable_run.py")
TIMEOUT = 300

#: The kill point of each process in turn (see ``tests/scripts/killable_run.py``).
CHAIN = [
    "step:2",  # epoch 1, before any checkpoint: the next run starts from scratch
    "save:2",  # inside the second checkpoint's write (the first landed at step 3)
    "knn:1",  # epoch 1 finished, k-NN running: its row is not written
    "log:1",  # epoch 1's row written, its checkpoint not: the row is cut and rewritten
    "saved:2",  # after a mid-epoch checkpoint landed, before the oldest is pruned
    "step:1",  # resumed mid-epoch, killed one step later
    "random",  # anywhere in the first second of training (or not at all, if it ends first)
    "-",  # to the end
]
#: The kills that leave the backend's own state to restore from a mid-epoch checkpoint
#: (weights, optimizer, EMA teacher, random generators, the data position). The rest of the
#: chain tests file handling (temporaries, the log row, pruning), which is the same Python code
#: on every backend; it runs whole on PyTorch only, the backend whose processes start fastest,
#: so that the suite stays inside its CI time on the other two.
BACKEND_CHAIN = ["knn:1", "saved:2", "step:1", "-"]


def _env(**extra):
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
        **extra,
    )


def _run(output, kill="-", *args, env=None):
    if kill == "random":
        kill = f"random:{random.SystemRandom().randrange(1 << 30)}"
        print(f"random kill: {kill}")  # shown when the test fails, to replay it
    cmd = [sys.executable, SCRIPT, output, kill, *args]
    proc = subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


def _script():
    """``tests/scripts/killable_run.py`` as a module (for its recipe)."""
    spec = importlib.util.spec_from_file_location("killable_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(path):
    return [keras.ops.convert_to_numpy(w) for w in keras.saving.load_model(path).weights]


def assert_same_run(resumed, reference):
    """The log rows and both saved backbones of two runs of the killable recipe agree to 1e-5."""
    rows, ref_rows = read_rows(os.path.join(resumed, "log.csv")), read_rows(os.path.join(reference, "log.csv"))
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows] == ["0", "1", "2"]
    assert list(rows[0]) == list(ref_rows[0])
    for row, ref in zip(rows, ref_rows):
        for key in ref:
            a, b = row[key], ref[key]
            if b == "NA":
                assert a == "NA", (key, row)
            else:
                np.testing.assert_allclose(float(a), float(b), rtol=0, atol=1e-5, err_msg=f"{key} {row['epoch']}")
    for name in ("teacher_backbone.keras", "student_backbone.keras"):
        for a, b in zip(_weights(os.path.join(resumed, name)), _weights(os.path.join(reference, name))):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (one per module: every test below compares with or copies it)."""
    output = str(tmp_path_factory.mktemp("reference") / "run")
    code, out = _run(output)
    assert code == 0, out[-4000:]
    return output


@pytest.fixture
def finished_run(reference, tmp_path):
    output = str(tmp_path / "run")
    shutil.copytree(reference, output)
    return output


def test_killed_and_resumed_run_equals_uninterrupted_run(reference, tmp_path):
    resumed = str(tmp_path / "resumed")
    for kill in CHAIN if keras.backend.backend() == "torch" else BACKEND_CHAIN:
        code, out = _run(resumed, kill, "--resume")
        if kill == "random" and code == 0:
            break  # the run ended before the random moment: nothing left to resume
        assert code == (0 if kill == "-" else -signal.SIGKILL), out[-4000:]
    assert "resuming from" in out
    assert_same_run(resumed, reference)
    # No temporaries left, the newest two checkpoints kept, the lock released.
    leftovers = [f for _, _, files in os.walk(resumed) for f in files if f.startswith(".tmp-")]
    assert not leftovers
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(resumed, "checkpoints"))] == [
        "checkpoint-e00003-s0000000.keras",
        "checkpoint-e00002-s0000001.keras",
    ]
    assert open(os.path.join(resumed, "run.lock")).read() == ""


def test_nan_at_the_end_of_an_epoch_leaves_a_finite_checkpoint(tmp_path):
    """A last update of epoch 2 that blows the weights up: the epoch's checkpoint is refused,
    the run stops with one message, and the previous checkpoint resumes."""
    output = str(tmp_path / "run")
    code, out = _run(output, "-", env=_env(KILLABLE_NAN_AT_STEP="8"))
    assert code == 2, out[-4000:]
    assert "keras-pqcl: error: The weights stopped being finite after epoch 2" in out
    assert "Traceback" not in out
    newest = list_checkpoints(os.path.join(output, "checkpoints"))[0]
    assert os.path.basename(newest) == "checkpoint-e00001-s0000002.keras"
    code, out = _run(output, "-", "--resume")
    assert code == 0, out[-4000:]
    assert f"resuming from {newest}" in out
    with open(os.path.join(output, "summary.json")) as f:
        assert np.isfinite(json.load(f)["last_loss"])


def test_second_run_on_a_locked_folder_is_refused(finished_run):
    """The lock is an OS file lock: held here, as a live run holds it, it stops a run."""
    with RunFolder(finished_run, resume=True, log=lambda m: None):
        code, out = _run(finished_run, "-", "--resume", "--epochs", "4")
    assert code == 2 and "is in use by another running keras-pqcl run (pid" in out, out[-2000:]
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "already holds a run"),
        (["--resume", "--batch-size", "4"], "--resume cannot change batch_size (was 8, now 4)"),
        (["--resume"], "has already trained all 3 of its epochs"),
    ],
)
def test_finished_run_refuses_reuse(finished_run, args, message, capsys):
    recipe = _script().write_recipe(os.path.dirname(finished_run))
    code = cli.main(["pretrain", "--recipe", recipe, "--output", finished_run, "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_longer_epochs_on_resume_extend_the_schedules(finished_run):
    code, out = _run(finished_run, "-", "--resume", "--epochs", "4")
    assert code == 0, out[-4000:]
    assert "the run now lasts 4 epochs (was 3)" in out
    rows = read_rows(os.path.join(finished_run, "log.csv"))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    # The schedules now span 4 epochs of 4 steps: the optimizer's and the model's clock.
    newest = list_checkpoints(os.path.join(finished_run, "checkpoints"))[0]
    assert newest.endswith("checkpoint-e00004-s0000000.keras")
    model = keras.saving.load_model(newest)
    assert model.optimizer.get_config()["learning_rate"]["config"]["total_steps"] == 16
    assert float(keras.ops.convert_to_numpy(model.schedules.total_steps)) == 16.0
