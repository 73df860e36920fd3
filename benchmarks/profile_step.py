"""Where the DINO training step's time goes on one Keras backend: profiler shares and ablations.

Default setting (issue #23): ViT-S/16, batch 8, 2 x 224 + 6 x 96 crops, K = 65536, the full
trainer (per-tensor clipping, centering, schedules, EMA, drop path 0.1, exact GELU).

Two tables, both measured in this one process so that their ratios are comparable:

1. **Top operations**: ``--profile-steps`` steps of ``model.fit`` under the backend's own
   profiler (torch: ``torch.profiler`` ``key_averages`` self time; TensorFlow and JAX: the
   XPlane trace of ``tf.profiler`` / ``jax.profiler``, host events summed per op name, and
   per op group with the numeric suffix of XLA instruction names dropped). Shares are of the
   profiled wall time of those steps. Ops that run at once on different threads (TensorFlow's
   inter-op pool) are each counted in full, so shares may add up to more than 100%; nested
   trace events are counted where they occur. The torch table uses self time only.
2. **Ablation**: the step timed with one trainer feature removed at a time, without editing
   the model: clipping off, K = 4096, no local crops, EMA a no-op (``ema_update`` patched),
   drop path 0, tanh-approximate GELU in the backbone MLPs, Keras' own AdamW instead of the
   DINO one (no schedules, no clipping, no decay groups); and a *bare* step with all of the
   removable features off at once (ViT + head + DINO loss + Keras AdamW, K and crops kept).
   Each row gives its step time over the full step's, same process.

    KERAS_BACKEND is set from --backend:
    python benchmarks/profile_step.py --backend torch
    python benchmarks/profile_step.py --backend tensorflow --jit True
    python benchmarks/profile_step.py --backend jax --quick          # vit_tiny-sized smoke test
    python benchmarks/profile_step.py --backend torch --variants full,bare,ema_off

Shared machines are noisy: read shares and same-invocation ratios, not absolute seconds.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

VARIANTS = {
    "full": "the full DINO step",
    "clip_off": "per-tensor clipping off",
    "k4096": "K = 4096 instead of 65536",
    "no_locals": "no local crops",
    "ema_off": "teacher EMA a no-op",
    "drop_path_0": "drop path 0 (student)",
    "gelu_tanh": "tanh-approximate GELU in the backbone MLPs",
    "keras_adamw": "keras.optimizers.AdamW (no schedules, clipping, decay groups)",
    "bare": "ViT + head + DINO loss + Keras AdamW: clip, EMA, drop path off",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, choices=["tensorflow", "jax", "torch"])
    parser.add_argument(
        "--jit",
        default="auto",
        choices=["auto", "True", "False"],
        help="compile(jit_compile=...): TensorFlow's XLA switch",
    )
    parser.add_argument("--quick", action="store_true", help="vit_tiny-sized toy model at 32 px (smoke test)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per ablation row, after one warm-up")
    parser.add_argument("--profile-steps", type=int, default=1, dest="profile_steps")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"ablation rows, comma-separated, from {','.join(VARIANTS)}; '' for none",
    )
    parser.add_argument("--no-profile", action="store_true", dest="no_profile")
    parser.add_argument(
        "--ab-optimizer",
        action="store_true",
        dest="ab_optimizer",
        help="torch: time the AdamW update per tensor (update_step loop) against the "
        "multi-tensor path, alternating, on the full model's variables",
    )
    args = parser.parse_args()
    args.jit = {"auto": "auto", "True": True, "False": False}[args.jit]
    if args.quick:
        args.patch, args.global_size, args.local_size, args.out_dim = 8, 32, 16, 256
        args.dim, args.depth, args.heads = 64, 2, 2
    else:
        args.patch, args.global_size, args.local_size, args.out_dim = 16, 224, 96, 65536
        args.dim, args.depth, args.heads = 384, 12, 6
    args.n_local = 6
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if bad:
        parser.error(f"unknown --variants {bad}; choose from {','.join(VARIANTS)}")
    return args


# --------------------------------------------------------------------------- model setup


def make_batch(args, n_local):
    import numpy as np

    rng = np.random.default_rng(0)
    batch = {"global_crops": rng.normal(size=(args.batch, 2, args.global_size, args.global_size, 3)).astype("float32")}
    if n_local:
        batch["local_crops"] = rng.normal(size=(args.batch, n_local, args.local_size, args.local_size, 3)).astype(
            "float32"
        )
    return batch


def build(args, variant):
    """``(model, batch)`` for one ablation row; EMA patching is done by the caller."""
    import keras
    from _timing import step_backbone

    import keras_pqcl as kp

    off = {variant} if variant != "bare" else {"clip_off", "ema_off", "drop_path_0", "keras_adamw"}
    keras.utils.set_random_seed(0)
    backbone = step_backbone(args, 0.0 if "drop_path_0" in off else 0.1)
    if "gelu_tanh" in off:
        for layer in backbone._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, kp.layers.Mlp):
                layer.fc1.activation = lambda x: keras.activations.gelu(x, approximate=True)
    model = kp.models.DINO(backbone, out_dim=4096 if "k4096" in off else args.out_dim)
    if "keras_adamw" in off:
        optimizer = keras.optimizers.AdamW(learning_rate=1e-5, weight_decay=0.04)
    else:
        optimizer = kp.optimizers.dino_adamw(args.batch, 100, 1000, clip_per_tensor=None if "clip_off" in off else 3.0)
    model.compile(optimizer=optimizer, jit_compile=args.jit)
    return model, make_batch(args, 0 if "no_locals" in off else args.n_local), "ema_off" in off


class patched_ema:
    """Context: the teacher EMA replaced by a no-op (where the model module looks it up)."""

    def __init__(self, active):
        self.active = active

    def __enter__(self):
        import keras_pqcl.backend as backend
        import keras_pqcl.models.base as base

        self.saved = base.ema_update
        if self.active:
            base.ema_update = backend.ema_update = lambda pairs, momentum: None

    def __exit__(self, *exc):
        import keras_pqcl.backend as backend
        import keras_pqcl.models.base as base

        base.ema_update = backend.ema_update = self.saved


def fit(model, batch, steps):
    """Wall seconds of each of ``steps`` fit steps (the loss read back to host every step)."""
    import keras
    import tensorflow as tf

    class Timer(keras.callbacks.Callback):
        times = []

        def on_train_batch_begin(self, i, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, i, logs=None):
            float(logs["loss"])
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    timer.times = []
    model.fit(
        tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer]
    )
    return timer.times


# --------------------------------------------------------------------------- profilers


def xplane_events(logdir):
    """``{op name: total microseconds}`` over the host planes' events of the newest XPlane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"no .xplane.pb under {logdir}: the profiler wrote nothing")
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                totals[names.get(event.metadata_id, "?")] += event.duration_ps / 1e6
    return totals


# Trace events that wrap a whole step (or the whole Python call) rather than one operation.
_WRAPPERS = re.compile(
    r"(^\$|TraceContext|__inference|train_function|one_step_on|multi_step_on|PjitFunction|"
    r"ExecuteOnLocalDevices|PjRt|Thunk::Execute|ThunkExecutor|XlaModule|jit_|EagerExecute|"
    r"EagerKernelExecute|FunctionRun|Iterator::|ExecutorState::Process|ExecutorDoneCallback|"
    r"RunGraph|InstantiatedCapturedFunction|tf_data|Execute$|DEVICE_MEMORY|KernelAndDeviceFunc|TFE_Py_|^Run$|ExecuteAsyncOnStream|BlockUntilReady)"
)


def op_group(name):
    """``'fusion.123'`` -> ``'fusion'``; ``'model/dense/MatMul:MatMul'`` -> ``'MatMul'``."""
    if ":" in name:
        name = name.rsplit(":", 1)[1]
    return re.sub(r"[._]\d+$", "", name.split("/")[-1])


def profile_xplane(backend, run):
    logdir = tempfile.mkdtemp(prefix=f"profile_{backend}_")
    if backend == "tensorflow":
        import tensorflow as tf

        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
        tf.profiler.experimental.stop()
    else:
        import jax

        jax.profiler.start_trace(logdir)
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
    totals = xplane_events(logdir)
    ops = collections.Counter({k: v for k, v in totals.items() if not _WRAPPERS.search(k)})
    groups = collections.Counter()
    for name, us in ops.items():
        groups[op_group(name)] += us
    return wall, ops, groups


def profile_torch(run):
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    ops = collections.Counter()
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total
    return wall, ops, None


def print_top(title, counter, wall_us, top):
    print(f"\n#### {title}\n")
    print("| op | ms | share of step |")
    print("|---|---|---|")
    for name, us in counter.most_common(top):
        print(f"| `{name[:90]}` | {us / 1e3:.1f} | {100 * us / wall_us:.1f}% |")


def ab_optimizer(args, repeats=5):
    """Median seconds of one AdamW update, per-tensor loop vs multi-tensor, alternated."""
    import keras
    import numpy as np
    import torch

    model, batch, _ = build(args, "full")
    fit(model, batch, 1)
    optimizer, variables = model.optimizer, model.trainable_variables
    grads = [torch.randn_like(v.value) * 1e-2 for v in variables]
    per_tensor = lambda: keras.optimizers.Optimizer._backend_update_step(
        optimizer, grads, variables, optimizer.learning_rate
    )
    multi = lambda: optimizer._backend_update_step(grads, variables, optimizer.learning_rate)
    times = {"per-tensor update_step loop": [], "torch._fused_adamw_ (+ multi-tensor clip)": []}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in zip(times, (per_tensor, multi)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["per-tensor update_step loop"]))
    print(f"\n#### AdamW update alone, torch, {len(variables)} tensors: median of {repeats}, alternated\n")
    print("| path | s | vs per-tensor |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {np.median(ts):.3f} | {np.median(ts) / base:.3f} |")


# --------------------------------------------------------------------------- main


def main():
    args = parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras

    assert keras.backend.backend() == args.backend, "KERAS_BACKEND was set before keras was imported"
    size = "ViT-tiny-ish dim 64 depth 2, 32 px" if args.quick else "ViT-S/16, 224 px globals, 96 px locals"
    print(
        f"### {args.backend} (jit_compile={args.jit}): {size}, batch {args.batch}, 2 globals + "
        f"{args.n_local} locals, K = {args.out_dim}\n"
    )
    if args.ab_optimizer:
        ab_optimizer(args)
    if not args.no_profile:
        model, batch, _ = build(args, "full")
        fit(model, batch, 1)  # trace / compile outside the profile
        run = lambda: fit(model, batch, args.profile_steps)
        if args.backend == "torch":
            wall, ops, groups = profile_torch(run)
        else:
            wall, ops, groups = profile_xplane(args.backend, run)
        wall_us = wall * 1e6
        print(f"- profiled {args.profile_steps} step(s): {wall:.2f} s wall (under the profiler)")
        print_top(f"top {args.top} ops, {args.backend} (jit={args.jit})", ops, wall_us, args.top)
        if groups:
            print_top(f"top {args.top} op groups, {args.backend} (jit={args.jit})", groups, wall_us, args.top)
        model = run = None  # free the profiled model before the ablation rows
        sys.stdout.flush()

    variants = [v for v in args.variants.split(",") if v]
    if not variants:
        return
    rows = []
    for variant in variants:
        model, batch, ema_off = build(args, variant)
        with patched_ema(ema_off):
            t0 = time.perf_counter()
            first = fit(model, batch, 1)[0]
            times = fit(model, batch, args.steps)
        rows.append((variant, sorted(times)[len(times) // 2], first, time.perf_counter() - t0))
        print(f"  {variant}: {rows[-1][1]:.2f} s/step", file=sys.stderr, flush=True)
        model = None
    full = dict((r[0], r[1]) for r in rows).get("full")
    print(f"\n#### ablation, {args.backend} (jit={args.jit}): median of {args.steps} step(s) after one warm-up\n")
    print("| row | removed | step s | vs full | first step s |")
    print("|---|---|---|---|---|")
    for variant, step_s, first, _ in rows:
        ratio = f"{step_s / full:.3f}" if full else "n/a"
        print(f"| {variant} | {VARIANTS[variant]} | {step_s:.2f} | {ratio} | {first:.1f} |")


if __name__ == "__main__":
    main()
