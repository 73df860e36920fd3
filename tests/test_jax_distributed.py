"""Two ``jax.distributed`` processes (CPU, gloo collectives) equal one process on the same
global batch.

``tests/scripts/multiprocess_step.py`` runs 3 DINO and 3 iBOT+PQCL steps on a global batch of
8: in one process on all 8 examples (the reference) and, at the same time, as 2 processes on
localhost joined through ``keras_pqcl.backend.init_jax_distributed`` from the ``KERAS_PQCL_*``
environment (coordinator on a free port), each feeding its own 4 examples
(``pretrain_dataset(..., shard=process_shard())``). Student, teacher, every center, the
logged loss and a DenseCL queue must agree. Only in the KERAS_BACKEND=jax leg.
"""

import keras
import pytest

from tests import multiprocess as mp

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax.distributed: only in the jax leg")


def test_dino_and_pqcl_two_processes_match_one_process(tmp_path):
    world, port = 2, mp.free_port()
    ranks = [
        dict(
            KERAS_PQCL_COORDINATOR=f"127.0.0.1:{port}",
            KERAS_PQCL_NUM_PROCESSES=str(world),
            KERAS_PQCL_PROCESS_ID=str(i),
        )
        for i in range(world)
    ]
    out = mp.run("jax", ("dino", "pqcl"), tmp_path, [{}, *ranks])
    for method, (single, *processes) in out.items():
        if method == "pqcl":
            assert {"center", "center_patch", "center_query"} <= {str(n) for n in single["names"]}
        mp.check_equal(single, processes)


def test_init_is_a_no_op_for_one_process(monkeypatch):
    from keras_pqcl.backend import init_jax_distributed

    for name in ("KERAS_PQCL_NUM_PROCESSES", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert init_jax_distributed() == (0, 1)
    monkeypatch.setenv("KERAS_PQCL_NUM_PROCESSES", "1")
    assert init_jax_distributed() == (0, 1)
    assert keras.distribution.distribution() is None


@pytest.mark.parametrize(
    "env, match",
    [
        ({"KERAS_PQCL_NUM_PROCESSES": "two"}, "KERAS_PQCL_NUM_PROCESSES='two' must be an integer"),
        ({"KERAS_PQCL_NUM_PROCESSES": "2"}, "needs the coordinator HOST:PORT"),
        (
            {"KERAS_PQCL_NUM_PROCESSES": "2", "KERAS_PQCL_COORDINATOR": "h:1", "KERAS_PQCL_PROCESS_ID": "2"},
            r"process_id=2 must lie in \[0, 2\)",
        ),
    ],
)
def test_bad_settings_fail_with_one_line(monkeypatch, env, match):
    from keras_pqcl.backend import init_jax_distributed

    for name in ("KERAS_PQCL_COORDINATOR", "KERAS_PQCL_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        init_jax_distributed()
