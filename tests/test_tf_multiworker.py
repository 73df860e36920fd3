"""Two ``MultiWorkerMirroredStrategy`` workers (CPU, ring collectives over gRPC) equal one
process on the same global batch.

``tests/scripts/multiprocess_step.py`` runs 3 DINO and 3 iBOT+PQCL steps on a global batch of
8: in one process on all 8 examples (the reference) and, at the same time, as 2 workers on
localhost described by ``TF_CONFIG`` (free ports), joined through
``keras_pqcl.backend.init_tf_multiworker`` and each feeding its own 4 examples
(``per_worker_dataset`` of ``pretrain_dataset(..., shard=process_shard())``). Student,
teacher, every center, the logged loss and a DenseCL queue must agree. Only in the
KERAS_BACKEND=tensorflow leg.
"""

import json

import keras
import pytest

from tests import multiprocess as mp

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute multi-worker: only in the tensorflow leg"
)


def test_dino_and_pqcl_two_workers_match_one_process(tmp_path):
    workers = [f"127.0.0.1:{mp.free_port()}" for _ in range(2)]
    ranks = [
        dict(TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
        for i in range(len(workers))
    ]
    out = mp.run("tensorflow", ("dino", "pqcl"), tmp_path, [{}, *ranks])
    for method, (single, *processes) in out.items():
        if method == "pqcl":
            assert {"center", "center_patch", "center_query"} <= {str(n) for n in single["names"]}
        mp.check_equal(single, processes)


def test_init_is_a_no_op_without_tf_config(monkeypatch):
    from keras_pqcl.backend import init_tf_multiworker, process_count

    for name in ("TF_CONFIG", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert init_tf_multiworker() is None and process_count() == 1


def test_bad_tf_config_fails_with_one_line(monkeypatch):
    from keras_pqcl.backend import init_tf_multiworker

    monkeypatch.setenv("TF_CONFIG", "{cluster: }")
    with pytest.raises(ValueError, match="TF_CONFIG='{cluster: }' is not JSON"):
        init_tf_multiworker()
