"""tune_input_pipeline: each case needs a fresh process (TensorFlow fixes both settings
when it runs its first op), so the checks run in subprocesses. They run in one backend
leg only: the code is the same whatever the test process's backend is."""

import json
import os
import subprocess
import sys

import keras
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="process settings; runs in the TensorFlow leg"
)

_SCRIPT = """
import json, logging, sys
logging.basicConfig()
import tensorflow as tf
if sys.argv[1] == "late":
    tf.constant(1.0) + 1.0  # TensorFlow has started: too late for both settings
from keras_pqcl.data import tune_input_pipeline
applied = tune_input_pipeline(input_only=sys.argv[2] == "1")
x = tf.zeros([256, 256]) + 1.0
print(json.dumps(dict(applied, threads=tf.config.threading.get_intra_op_parallelism_threads())))
"""


def _run(when, input_only, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("TF_CPU_ALLOCATOR_USE_BFC", "TF_NUM_INTRAOP_THREADS")}
    environ.update(
        env,
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, when, "1" if input_only else "0"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_before_the_first_op_both_settings_take_effect():
    applied, err = _run("early", input_only=True)
    assert applied["bfc_allocator"] is True
    assert applied["intra_op_threads"] == 1 and applied["threads"] == 1
    assert "could not be set" not in err


def test_a_process_that_also_trains_with_tensorflow_keeps_its_thread_pool():
    applied, _ = _run("early", input_only=False)
    assert applied["bfc_allocator"] is True
    assert applied["intra_op_threads"] is None and applied["threads"] == 0


def test_too_late_says_what_was_not_set_and_carries_on():
    applied, err = _run("late", input_only=True)
    assert applied == {"bfc_allocator": False, "intra_op_threads": None, "threads": 0}
    assert "the BFC allocator" in err and "one intra-op thread" in err
    assert "tune_input_pipeline() right after the imports" in err


def test_the_users_own_settings_win():
    applied, err = _run("early", input_only=True, TF_CPU_ALLOCATOR_USE_BFC="false", TF_NUM_INTRAOP_THREADS="2")
    assert applied["bfc_allocator"] is False
    assert applied["threads"] == 0  # the variable is read by the runtime, not the config API
    assert "could not be set" not in err
