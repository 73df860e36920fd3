"""Launching N local training processes and comparing them with one, for the multi-process tests.

Used by test_jax_distributed.py and test_tf_multiworker.py with
``tests/scripts/multiprocess_step.py``: every process writes an ``.npz`` of the student,
teacher and center values before and after 3 steps, the logged losses and a DenseCL queue.
:func:`launch` runs a launcher such as ``torchrun`` and kills it and every process it
started if it does not finish in time (test_torchrun_cli.py).
"""

import os
import signal
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "scripts", "multiprocess_step.py")
# A whole run takes 20-60 s on 2 shared cores; past this a process is stuck (e.g. waiting
# for a dead peer) and every process of the run is killed.
TIMEOUT = 300
# Variables of an enclosing distributed launch that must not leak into the test's processes.
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TF_CONFIG",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "KERAS_PQCL_COORDINATOR",
    "KERAS_PQCL_NUM_PROCESSES",
    "KERAS_PQCL_PROCESS_ID",
)


def tiny_pretrain(output, epochs, batch_size=8):
    """The arguments after ``-m keras_pqcl.cli`` of the tests' tiny run: ``pretrain`` of the
    tiny recipe on 32 synthetic scenes, ``epochs`` epochs of 2 steps of ``batch_size``."""
    args = ["pretrain", "--recipe", "tiny", "--data", "synthetic_scenes:32", "--epochs", str(epochs)]
    return [*args, "--steps-per-epoch", "2", "--batch-size", str(batch_size), "--output", str(output)]


def free_port():
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(backend, **extra):
    out = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    # One thread pool per process on shared cores; no GPU even where one exists.
    out.update(KERAS_BACKEND=backend, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", **extra)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return out


def run(backend, methods, tmp_path, envs):
    """Runs ``multiprocess_step.py`` for ``methods`` once per environment of ``envs``, all at
    once (e.g. the one-process reference next to the N processes).

    Every process is killed if any has not finished within ``TIMEOUT``. Returns
    ``{method: [output of each process, in the order of envs]}``; fails with the output of a
    process that failed.
    """
    procs, outs = [], []
    for i, extra in enumerate(envs):
        out = str(tmp_path / f"{backend}_{i}")
        procs.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, backend, ",".join(methods), out],
                env=env(backend, **extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        outs.append(out)
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{stdout[-2000:]}\n{stderr[-6000:]}"
    return {m: [np.load(f"{o}_{m}.npz") for o in outs] for m in methods}


def check_equal(single, ranks, shares=True):
    """Every process holds the one-process values (atol 1e-5) and exactly rank 0's values.

    ``shares``: each process fed its own share of the global batch (JAX, TensorFlow); False:
    each built the whole global batch and the step split it (the torch test)."""
    world = len(ranks)
    assert int(single["world"]) == 1 and [int(r["world"]) for r in ranks] == [world] * world
    assert [int(r["rank"]) for r in ranks] == list(range(world))
    assert int(single["iterations"]) == 3 and all(int(r["iterations"]) == 3 for r in ranks)
    if shares:  # the processes' shares add up to the one-process batch
        np.testing.assert_allclose(sum(r["batch_sum"] for r in ranks), single["batch_sum"], rtol=1e-9)
        assert not np.array_equal(ranks[0]["batch_sum"], ranks[1]["batch_sum"])
    else:
        for r in ranks:
            np.testing.assert_array_equal(r["batch_sum"], single["batch_sum"])
    names = [str(n) for n in single["names"]]
    centers = [n for n in names if n.startswith("center")]
    assert centers and any(n.startswith("teacher/") for n in names)
    for r in ranks:
        assert [str(n) for n in r["names"]] == names
    for i, name in enumerate(names):
        for r in ranks:
            np.testing.assert_array_equal(r[f"init/{i}"], single[f"init/{i}"], err_msg=f"{name}: initial")
            np.testing.assert_array_equal(r[f"final/{i}"], ranks[0][f"final/{i}"], err_msg=f"{name}: ranks differ")
        np.testing.assert_allclose(ranks[0][f"final/{i}"], single[f"final/{i}"], rtol=0, atol=1e-5, err_msg=name)
    # The logged loss is the global-batch mean in every process, step by step.
    for r in ranks:
        np.testing.assert_allclose(r["loss"], single["loss"], rtol=0, atol=1e-5)
    # The steps moved student, teacher and every center, so the comparison is not trivial.
    for prefix in ("student/", "teacher/", *centers):
        moved = max(
            np.abs(single[f"final/{i}"] - single[f"init/{i}"]).max()
            for i, name in enumerate(names)
            if (name.startswith(prefix) if prefix.endswith("/") else name == prefix)
        )
        assert moved > 1e-4, prefix
    # DenseCL's queue receives the global batch of keys, in process order.
    for r in ranks:
        np.testing.assert_array_equal(r["queue_entries"], single["queue_entries"])
        np.testing.assert_array_equal(r["queue_pointer"], single["queue_pointer"])


def assert_same_log(rows, single):
    """The rows of a multi-process run's ``log.csv`` hold the one-process run's loss and teacher
    entropy (to 1e-5)."""
    assert len(rows) == len(single)
    for column in ("loss", "teacher_entropy"):
        np.testing.assert_allclose(
            [float(r[column]) for r in rows], [float(r[column]) for r in single], rtol=0, atol=1e-5, err_msg=column
        )


def _descendants(pid):
    """Pids of the live processes descended from ``pid``, read from ``/proc`` (Linux; empty
    elsewhere). Needed because ``torchrun`` starts each worker in a session of its own, so
    killing the launcher's process group leaves the workers running."""
    parents = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (name) state ppid ...": the name may hold spaces and parentheses.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc):
    # The descendants first: once the launcher dies they are re-parented and cannot be found.
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def launch(args, env, timeout=TIMEOUT):
    """Run ``args`` (a launcher and what it starts) to the end; ``(exit code, output)`` with
    stderr merged into stdout.

    Past ``timeout`` seconds (or if the test is interrupted) the launcher and every process
    it started are killed and the test fails with the output so far, so a process waiting
    for a dead peer cannot hang the test run.
    """
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(args[:6])} ... did not finish within {timeout} s:\n{out[-6000:]}") from None
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
            proc.communicate()
    return proc.returncode, out


def launch_together(runs, timeout=TIMEOUT):
    """Start every ``(args, env)`` of ``runs`` at once (e.g. the N processes of one run) and
    return ``[(exit code, output)]`` in their order, stderr merged into stdout.

    One deadline for all: past ``timeout`` seconds every process still running is killed
    and the test fails with their outputs, so processes waiting for a dead peer cannot hang
    the test run. A process that failed lets the others end by themselves (they notice the
    lost peer and exit, which the caller then sees as a nonzero exit code).
    """
    import tempfile
    import time

    procs = []
    with tempfile.TemporaryDirectory() as folder:
        try:
            for i, (args, env) in enumerate(runs):
                log = open(os.path.join(folder, f"{i}.log"), "w+")
                procs.append((subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), log))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
                time.sleep(0.5)
            late = [i for i, (p, _) in enumerate(procs) if p.poll() is None]
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outs = []
        for p, log in procs:
            log.seek(0)
            outs.append((p.returncode, log.read()))
            log.close()
    if late:
        shown = "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, (_, out) in enumerate(outs))
        raise AssertionError(f"processes {late} did not finish within {timeout} s:\n{shown}")
    return outs
