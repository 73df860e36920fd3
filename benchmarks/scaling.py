"""Images/s of one DINO training step with 1 and 2 local processes per Keras backend (issue 20).

Default setting: ViT-S/16, out_dim 65536, 2 x 224 + 6 x 96 synthetic crops, batch 8 PER
PROCESS (global batch 8 x processes), the full trainer (clipping, centering, schedules, EMA).
Each (backend, process count) is one launch of fresh processes on localhost, joined through
the library's own engines: torch ``init_torch_distributed`` (the torchrun variables, gloo),
JAX ``init_jax_distributed`` (the ``KERAS_PQCL_*`` variables, gloo) and TensorFlow
``init_tf_multiworker`` (``TF_CONFIG``, ring collectives over gRPC). The cores this process may
use are split evenly: one process gets all of them, each of two processes its own half
(CPU affinity, plus OMP / intra-op thread counts set to the share).

The table gives the step time (the slowest process's median over ``--steps`` steps after
``--warmup`` untimed ones), images/s of the global batch, the scaling efficiency (images/s
with N processes / (N x images/s with 1)), the images/s ratio N processes / 1 process, and
the share of the step spent in collectives: the gradient all-reduce alone (tensors of the
model's trainable shapes, summed over the same process group with the backend's own
collective, timed after training) over the N-process step time. It is an estimate: the
step's other collectives (centers, logged losses) are left out, and inside the step the
all-reduce may overlap other work.

On a machine with few cores the N processes share cores the one process already used, so
the table shows the overhead of multi-process training, not a speed-up.

    python benchmarks/scaling.py                                  # ViT-S/16, all backends
    python benchmarks/scaling.py --backends torch --steps 3 --out scaling.md
    python benchmarks/scaling.py --quick                          # smoke test (vit_tiny, 2 blocks, 32 px)

Shared machines are noisy: compare rows measured in one invocation.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Collective timing: repetitions after one untimed call (median reported).
REPEATS = 5


# --------------------------------------------------------------------------- worker


def pin_cores(cores):
    """Restrict this process to ``cores`` before any framework starts its thread pools."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def join(backend):
    """Joins this launch's process group; ``(rank, world, tf strategy or None)``."""
    from keras_pqcl import backend as kb

    if backend == "torch":
        rank, world = kb.init_torch_distributed(timeout_s=600)
        return rank, world, None
    if backend == "jax":
        rank, world = kb.init_jax_distributed()
        return rank, world, None
    strategy = kb.init_tf_multiworker(timeout_s=600)
    return kb.process_index(), kb.process_count(), strategy


def set_threads(backend, threads):
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def local_batch(args, rank):
    """This process's ``--batch`` examples of synthetic crops (different in every process)."""
    import numpy as np

    rng = np.random.default_rng(rank)
    shape = lambda n, size: (args.batch, n, size, size, 3)
    return {
        "global_crops": rng.normal(size=shape(2, args.global_size)).astype("float32"),
        "local_crops": rng.normal(size=shape(args.n_local, args.local_size)).astype("float32"),
    }


def build(args, world):
    import keras
    from _timing import step_backbone

    import keras_pqcl as kp

    keras.utils.set_random_seed(0)
    backbone = step_backbone(args)
    model = kp.models.DINO(backbone, out_dim=args.out_dim)
    model.compile(optimizer=kp.optimizers.dino_adamw(args.batch * world, 100, 1000))
    return model


def time_all_reduce(backend, model, world, strategy):
    """Median seconds of summing tensors of the model's trainable shapes over the process
    group with the backend's own collective; checks the sum once (every process adds ones)."""
    import numpy as np

    shapes = [(tuple(v.shape), v.dtype) for v in model.trainable_variables]
    if backend == "torch":
        import torch
        import torch.distributed as dist

        from keras_pqcl.backend import _all_reduce_sum

        tensors = [torch.ones(s, dtype=getattr(torch, d)) for s, d in shapes]

        def call():
            out = _all_reduce_sum(tensors)
            return float(out[0].reshape(-1)[0])

        sync = dist.barrier
    elif backend == "jax":
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        # One row per process of a (world, *shape) array sharded over the processes' devices;
        # the jitted sum over that axis is a cross-process all-reduce (gloo on CPU).
        mesh = Mesh(np.array(jax.devices()), ("process",))
        rows = NamedSharding(mesh, PartitionSpec("process"))
        replicated = NamedSharding(mesh, PartitionSpec())
        arrays = [jax.make_array_from_process_local_data(rows, np.ones((1, *s), d)) for s, d in shapes]
        summed = jax.jit(lambda xs: [x.sum(axis=0) for x in xs], out_shardings=replicated)

        def call():
            out = jax.block_until_ready(summed(arrays))
            return float(np.asarray(out[0].addressable_data(0)).reshape(-1)[0])

        # The jitted sum is itself a synchronisation point; a tiny one lines the processes up.
        flag = jax.make_array_from_process_local_data(rows, np.ones((1,), "float32"))
        sync_fn = jax.jit(lambda x: x.sum(), out_shardings=replicated)
        sync = lambda: jax.block_until_ready(sync_fn(flag))
    else:
        import tensorflow as tf

        tensors = [tf.ones(s, d) for s, d in shapes]

        def replica(xs):
            # The copy places each input on this replica's device; without one the
            # collective has no destination ("destinations can not be empty").
            xs = [tf.identity(x) for x in xs]
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, xs)

        reduce = tf.function(lambda xs: strategy.run(replica, args=(xs,)))
        small = tf.function(lambda xs: strategy.run(replica, args=(xs,)))
        one = [tf.ones((1,), "float32")]

        def call():
            out = reduce(tensors)
            return float(tf.reshape(strategy.experimental_local_results(out[0])[0], [-1])[0])

        sync = lambda: small(one)

    total = call()  # compiles / warms up, and checks the sum
    if abs(total - world) > 1e-6:
        raise RuntimeError(f"all-reduce check: got {total}, expected {world}")
    times = []
    for _ in range(REPEATS):
        sync()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    count = sum(int(np.prod(s)) for s, _ in shapes)
    return float(np.median(times)), count


def worker(args):
    """Runs in each process of a launch; prints one JSON line."""
    pin_cores([int(c) for c in args.cores.split(",")] if args.cores else None)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras
    import tensorflow as tf

    from _timing import time_fit_steps

    backend = keras.backend.backend()
    set_threads(backend, args.threads)
    rank, world, strategy = join(backend)
    started_s = time.perf_counter() - T0
    batch = local_batch(args, rank)
    if strategy is not None:
        from keras_pqcl.backend import per_worker_dataset

        with strategy.scope():
            model = build(args, world)
        dataset = per_worker_dataset(lambda: tf.data.Dataset.from_tensors(batch).repeat(), strategy)
    else:
        model = build(args, world)
        dataset = None
    first_s, step_s = time_fit_steps(model, batch, args.steps, dataset=dataset, warmup=args.warmup)
    allreduce_s, values = time_all_reduce(backend, model, world, strategy) if world > 1 else (None, None)
    print(
        json.dumps(
            dict(
                backend=backend,
                rank=rank,
                world=world,
                first_s=first_s,
                step_s=step_s,
                allreduce_s=allreduce_s,
                values=values,
                cores=args.cores,
                started_s=started_s,
                threads=args.threads,
            )
        ),
        flush=True,
    )
    if backend == "torch" and world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- driver


def core_shares(n):
    """The cores this process may use, split into ``n`` equal shares (at least one core each)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    k = max(len(cores) // n, 1)
    return [cores[(i * k) % len(cores) : (i * k) % len(cores) + k] for i in range(n)]


def launch_env(backend, world, rank, ports, threads):
    from tests.multiprocess import env

    out = env(backend, TF_CPP_MIN_LOG_LEVEL="3")
    t = str(threads)
    out.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, TF_NUM_INTRAOP_THREADS=t, TF_NUM_INTEROP_THREADS=t)
    if threads == 1:
        # XLA's CPU backend otherwise sizes its Eigen pool from the machine, not the affinity.
        out["XLA_FLAGS"] = " ".join(
            [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
        ).strip()
    if world == 1:
        return out
    if backend == "torch":
        out.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(ports[0]),
        )
    elif backend == "jax":
        out.update(
            KERAS_PQCL_COORDINATOR=f"127.0.0.1:{ports[0]}",
            KERAS_PQCL_NUM_PROCESSES=str(world),
            KERAS_PQCL_PROCESS_ID=str(rank),
        )
    else:
        workers = [f"127.0.0.1:{p}" for p in ports]
        out["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}})
    return out


def _kill(procs):
    # Each worker leads its own session: killing the group also ends anything it started.
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
    for p in procs:
        p.wait()


def launch(backend, world, args):
    """Runs ``world`` worker processes at once; their JSON results in rank order, or None
    (after printing why) when one failed or the launch ran past ``--timeout``. A failed
    process gets the others killed at once, so none waits for a dead peer."""
    from tests.multiprocess import free_port

    ports = [free_port() for _ in range(world)]
    shares = core_shares(world)
    procs, logs = [], []
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps)]
    base += ["--warmup", str(args.warmup), "--batch", str(args.batch), "--n-local", str(args.n_local)]
    base += ["--arch", args.arch, "--depth", str(args.depth)] + (["--quick"] if args.quick else [])
    try:
        for rank in range(world):
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            cores = shares[rank]
            cmd = base + ["--cores", ",".join(map(str, cores)), "--threads", str(len(cores))]
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=launch_env(backend, world, rank, ports, len(cores)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                    cwd=ROOT,
                )
            )
        deadline = time.monotonic() + args.timeout
        failed = None
        while any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), failed)
        stuck = failed is None and any(p.poll() is None for p in procs)
    finally:
        _kill(procs)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    what = f"{backend} with {world} process{'es' if world > 1 else ''}"
    if stuck:
        print(f"{what}: stopped after {args.timeout:.0f} s\n{outputs[0][-3000:]}", file=sys.stderr)
        return None
    if failed is not None:
        print(f"{what}: process {failed} failed\n{outputs[failed][-3000:]}", file=sys.stderr)
        return None
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            print(f"{what}: no result\n{out[-3000:]}", file=sys.stderr)
            return None
        results.append(json.loads(lines[-1]))
    return sorted(results, key=lambda r: r["rank"])


ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def configure(args):
    if args.quick:
        args.arch = "vit_tiny"
        args.patch, args.global_size, args.local_size, args.out_dim = 8, 32, 16, 256
    else:
        args.patch, args.global_size, args.local_size, args.out_dim = 16, 224, 96, 65536
    args.dim, depth, args.heads = ARCHS[args.arch]
    # --quick: 2 blocks, since compiling 12 (JAX, TensorFlow) takes most of a short run.
    args.depth = args.depth or (2 if args.quick else depth)
    if args.steps is None:
        args.steps = 5 if args.quick else 2
    if args.timeout is None:
        args.timeout = 240 if args.quick else 1500


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def table(args, rows, failures):
    """The report as a list of lines (Markdown)."""
    from _official import machine

    cores = len(core_shares(1)[0])
    preset_depth = ARCHS[args.arch][1]
    reduced = f" of the preset's {preset_depth}" if args.depth != preset_depth else ""
    lines = [f"### DINO step with 1 and 2 local processes, {machine()}", ""]
    lines.append(
        f"- settings: {args.arch} (dim {args.dim}, depth {args.depth}{reduced}, heads {args.heads}), "
        f"patch {args.patch}, batch {args.batch} per process, "
        f"2x{args.global_size} + {args.n_local}x{args.local_size} crops, out_dim {args.out_dim}; "
        f"step time: the slowest process's median of {args.steps} steps after {args.warmup} untimed"
    )
    lines.append(
        f"- cores: 1 process uses all {cores}; each of 2 processes is pinned to its own "
        f"{max(cores // 2, 1)} (affinity, and OMP / intra-op / XLA threads set to match)"
    )
    if cores <= 2:
        lines.append(
            f"- **on {cores} cores, 2 processes show the overhead of multi-process training, not a speed-up**: "
            "each process gets half the cores the one process had, for the same batch per process, so the "
            "same cores serve twice the images per step. Without overhead the images/s would stay as with 1 "
            "process ('x 1 process' 1.0, efficiency 0.5); below that is overhead"
        )
    lines.append(
        "- efficiency = images/s with 2 processes / (2 x images/s with 1); collectives share = the gradient "
        "all-reduce alone (tensors of the trainable shapes, summed over the same 2-process group, median of "
        f"{REPEATS} after one untimed) / the 2-process step time"
    )
    lines.append(
        "- all-reduce used: torch `keras_pqcl.backend._all_reduce_sum` (bucketed `dist.all_reduce`, gloo); "
        "JAX a jitted sum over a (2, ...) array sharded across the 2 processes' devices (XLA all-reduce, "
        "gloo); TensorFlow `ReplicaContext.all_reduce(SUM)` under the MultiWorkerMirroredStrategy "
        "(ring over gRPC)"
    )
    lines.append(
        "- first step s: the first step of the slowest process (compilation included, not in the timing); load: "
        "the machine's 1-minute load average just before the launch (other work on the cores shows here); "
        "launch s: wall time of the whole launch (start, compile, steps, all-reduce timing)"
    )
    for f in failures:
        lines.append(f"- {f}: failed or timed out (see stderr); its cells are n/a")
    lines.append("")
    columns = [
        "backend",
        "processes",
        "global batch",
        "step s",
        "images/s",
        "efficiency",
        "x 1 process",
        "all-reduce s",
        "collectives share",
        "first step s",
        "launch s",
        "load",
    ]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    single = {}
    for backend, world, res, load, wall in rows:
        if res is None:
            lines.append(f"| {backend} | {world} | {args.batch * world} |" + " n/a |" * 8 + f" {load:.1f} |")
            continue
        step = max(r["step_s"] for r in res)
        first = max(r["first_s"] for r in res)
        ips = args.batch * world / step
        if world == 1:
            single[backend] = ips
            eff, ratio, ar, share = "1 (reference)", "1", "-", "-"
        else:
            eff = fmt(ips / (world * single[backend]) if backend in single else None, ".2f")
            ratio = fmt(ips / single[backend] if backend in single else None, ".2f")
            ar_s = max(r["allreduce_s"] for r in res)
            ar = f"{ar_s:.3f}"
            share = f"{100 * ar_s / step:.1f}%"
        cells = [
            backend,
            str(world),
            str(args.batch * world),
            f"{step:.3f}",
            f"{ips:.3f}",
            eff,
            ratio,
            ar,
            share,
            f"{first:.1f}",
            f"{wall:.0f}",
            f"{load:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    values = next((r[0]["values"] for _, w, r, _, _ in rows if w > 1 and r), None)
    if values:
        lines.append("")
        lines.append(
            f"All-reduce size: {values / 1e6:.1f} M float32 values ({4 * values / 2**20:.0f} MiB) per process."
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="torch,jax,tensorflow")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps after the warm-up (default 2; 5 with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation)")
    parser.add_argument("--batch", type=int, default=8, help="examples per process")
    parser.add_argument("--n-local", type=int, default=6, dest="n_local")
    parser.add_argument("--arch", default="vit_small", choices=sorted(ARCHS), help="ViT preset; --quick: vit_tiny")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: the preset's; 2 with --quick)")
    parser.add_argument(
        "--quick", action="store_true", help="vit_tiny/8 with 2 blocks on 32 + 16 px crops, out_dim 256 (smoke test)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per launch before every process is killed (default 240 quick, 1500)",
    )
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cores", default="", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure(args)
    if args.worker:
        return worker(args)

    sys.path.insert(0, ROOT)
    rows, failures = [], []
    for backend in args.backends.split(","):
        for world in (1, 2):
            t0, load = time.perf_counter(), os.getloadavg()[0]
            res = launch(backend, world, args)
            rows.append((backend, world, res, load, time.perf_counter() - t0))
            if res is None:
                failures.append(f"{backend} x {world}")
                print(f"  {backend} x {world}: failed ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            else:
                step = max(r["step_s"] for r in res)
                print(
                    f"  {backend} x {world}: step {step:.3f} s, {args.batch * world / step:.3f} images/s "
                    f"(launch {time.perf_counter() - t0:.0f} s, joined after {max(r['started_s'] for r in res):.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    text = "\n".join(table(args, rows, failures))
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
