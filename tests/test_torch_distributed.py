"""Two ``torch.distributed`` ranks (gloo, CPU) equal one process on the same global batch.

``tests/scripts/torch_ddp_step.py`` runs 3 DINO or iBOT+PQCL steps on a global batch of 8:
once in one process on all 8 examples (the reference) and once as 2 ranks of 4 examples each,
launched here as ``torchrun`` would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free localhost port). Student, teacher, every center, the logged loss and
a DenseCL queue must agree. Only in the KERAS_BACKEND=torch leg (see test_distribution.py for
TensorFlow and JAX).
"""

import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import multiprocess as mp

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "scripts", "torch_ddp_step.py")
TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch.distributed: only in the KERAS_BACKEND=torch leg"
)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # One thread per process: the ranks share the machine's cores.
    env.update(KERAS_BACKEND="torch", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return env


def _check_exit(proc, stdout, stderr, what):
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{stdout[-2000:]}\n{stderr[-6000:]}"


def run_single(method, tmp_path):
    out = str(tmp_path / f"{method}_single.npz")
    proc = subprocess.run(
        [sys.executable, SCRIPT, method, out], env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    _check_exit(proc, proc.stdout, proc.stderr, "the one-process run")
    return np.load(out)


def run_ranks(method, tmp_path, world=2):
    """``world`` processes with the torchrun environment; their outputs in rank order.

    Both are killed if either has not finished within the timeout (a rank waiting for a dead
    peer would otherwise hang until gloo's own timeout)."""
    port = str(_free_port())
    procs, outs = [], []
    for rank in range(world):
        out = str(tmp_path / f"{method}_rank{rank}.npz")
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, method, out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        outs.append(out)
    try:
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        _check_exit(p, stdout, stderr, f"rank {rank}")
    return [np.load(o) for o in outs]


def check_equal(single, ranks):
    """The shared N-vs-1 check; each rank built the whole global batch (the step splits it)."""
    mp.check_equal(single, ranks, shares=False)


def test_dino_two_ranks_match_one_process(tmp_path):
    check_equal(run_single("dino", tmp_path), run_ranks("dino", tmp_path))


def test_pqcl_two_ranks_match_one_process_with_three_centers(tmp_path):
    single = run_single("pqcl", tmp_path)
    assert {"center", "center_patch", "center_query"} <= {str(n) for n in single["names"]}
    check_equal(single, run_ranks("pqcl", tmp_path))


def test_init_is_a_no_op_without_world_size(monkeypatch):
    import torch.distributed as dist

    from keras_pqcl.backend import init_torch_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_torch_distributed() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_torch_distributed() == (0, 1)
    assert not dist.is_initialized()


def test_gradient_buckets_keep_order_dtype_and_size():
    import torch

    from keras_pqcl.backend import _buckets

    tensors = [torch.zeros(10), torch.zeros(30), torch.zeros(3, dtype=torch.float64), torch.zeros(5), torch.zeros(50)]
    # 100 bytes: 10 + 30 float32 (160 B) do not fit together; the float64 tensor is apart.
    assert _buckets(tensors, 100) == [[0], [1], [2], [3], [4]]
    # 200 bytes: 10 + 30 + 5 float32 (180 B) fit; the 50 (200 B) then opens a new bucket.
    assert _buckets(tensors, 200) == [[0, 1, 3], [2], [4]]
    assert _buckets(tensors, 10**6) == [[0, 1, 3, 4], [2]]


def test_sync_step_keeps_missing_gradients_and_averages_tracked_logs():
    """``_torch_sync_step`` in a one-rank gloo group (the all-reduce is then the identity),
    told the world has 2 ranks: gradients pass through, a gradient no rank has stays
    ``None``, and only the loss and the tracked log terms are divided by the world size."""
    import torch
    import torch.distributed as dist

    from keras_pqcl.backend import _torch_sync_step

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        variables = [keras.Variable(np.zeros((2, 3), "float32")), keras.Variable(np.zeros(4, "float32"))]
        grads = [torch.arange(6, dtype=torch.float32).reshape(2, 3), None]
        logs = {"dino": torch.tensor(3.0), "learning_rate": torch.tensor(0.5)}
        out, loss, logs = _torch_sync_step(grads, variables, torch.tensor(4.0), logs, {"loss", "dino"}, 2)
    finally:
        dist.destroy_process_group()
    assert torch.equal(out[0], grads[0]) and out[1] is None
    assert float(loss) == 2.0 and float(logs["dino"]) == 1.5 and float(logs["learning_rate"]) == 0.5
