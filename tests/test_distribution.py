"""Data-parallel DINO and iBOT+PQCL steps equal single-device steps on the same global batch.

Each multi-device run needs a fresh process (device splitting must happen before the
framework starts), so ``tests/scripts/dist_step.py`` runs in a subprocess. To keep the
3-backend CI loop from repeating them, the TensorFlow check runs only when
KERAS_BACKEND=tensorflow and the JAX check only when KERAS_BACKEND=jax.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BACKEND = keras.backend.backend()


def _run_dist_step(mode, tmp_path, method="dino"):
    out_path = str(tmp_path / f"{mode}_{method}.npz")
    env = dict(
        os.environ, KERAS_BACKEND=mode, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    )
    cmd = [sys.executable, os.path.join(HERE, "scripts", "dist_step.py"), mode, out_path, str(tmp_path), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return np.load(out_path)


def _check(out):
    assert int(out["replicas"]) == 2
    assert list(out["iterations"]) == [2, 2]
    np.testing.assert_allclose(out["dist_loss"], out["single_loss"], rtol=0, atol=1e-5)
    names = [str(n) for n in out["names"]]
    assert "center" in names and any(n.startswith("teacher/") for n in names)
    centers = [n for n in names if n.startswith("center")]
    for i, name in enumerate(names):
        single, dist = out[f"single/{i}"], out[f"dist/{i}"]
        # Every replica / device holds the same value: nothing (center, teacher) diverged.
        copies = [out[k] for k in out.files if k.startswith("replica") and k.endswith(f"/{i}")]
        assert len(copies) == 2, name
        for copy in copies:
            np.testing.assert_array_equal(copy, dist, err_msg=f"{name}: replicas differ")
        np.testing.assert_allclose(dist, single, rtol=0, atol=1e-5, err_msg=name)
    # The steps moved student, teacher and center, so the comparison is not trivial.
    for prefix in ("student/", "teacher/", *centers):
        moved = max(
            np.abs(out[f"single/{i}"] - out[f"init/{i}"]).max()
            for i, name in enumerate(names)
            if (name.startswith(prefix) if prefix.endswith("/") else name == prefix)
        )
        assert moved > 1e-5, prefix


@pytest.mark.skipif(BACKEND != "tensorflow", reason="runs once per CI loop: in the KERAS_BACKEND=tensorflow leg")
def test_mirrored_strategy_two_replicas_match_one(tmp_path):
    _check(_run_dist_step("tensorflow", tmp_path))


@pytest.mark.skipif(BACKEND != "jax", reason="runs once per CI loop: in the KERAS_BACKEND=jax leg")
def test_jax_data_parallel_two_devices_match_one(tmp_path):
    _check(_run_dist_step("jax", tmp_path))


@pytest.mark.skipif(BACKEND not in ("tensorflow", "jax"), reason="TF and JAX legs only (see module docstring)")
def test_pqcl_two_replicas_match_one_with_three_centers(tmp_path):
    """The CLS, patch and query centers are updated from the global batch, not per replica."""
    out = _run_dist_step(BACKEND, tmp_path, "pqcl")
    assert {"center", "center_patch", "center_query"} <= {str(n) for n in out["names"]}
    _check(out)


@pytest.mark.skipif(BACKEND != "torch", reason="torch single-process behaviour; only in the torch leg")
def test_torch_single_process_is_one_replica():
    """Torch runs one device per process (two processes: test_torch_distributed.py); without
    an initialised ``torch.distributed`` the reductions are the identity. Training on a single
    device is covered by test_training.py."""
    import torch
    import torch.distributed as dist

    from keras_pqcl import backend as kb

    assert not (dist.is_available() and dist.is_initialized())
    assert kb.num_replicas_in_sync() == 1
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    y = kb.cross_replica_mean(x)
    assert torch.equal(y, x)
