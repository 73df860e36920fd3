"""Images/s of one DINO training step per Keras backend, on synthetic crops.

Default setting (issue #3): ViT-S/16, batch 8, 2 x 224 + 6 x 96 crops, out_dim 65536, the full
trainer (clipping, centering, schedules, EMA). Each backend runs in its own subprocess; the
table gives images/s, the first step (compile) time, the share of the step spent in the
teacher EMA, and the fraction of this machine's fp32 matmul peak (NumPy GEMM).

    python benchmarks/dino_step.py                       # all three backends
    python benchmarks/dino_step.py --backends jax --steps 5
    python benchmarks/dino_step.py --quick               # tiny model, seconds (smoke test)

Compare ratios measured in one run; shared machines are noisy.
"""

import argparse
import json
import time

from _subprocess import run_worker
from _timing import time_fit_steps


def vit_flops_per_image(size, patch, dim, depth, mlp_ratio=4.0):
    """Forward FLOPs (2 x MACs) of a ViT on one ``size`` x ``size`` image."""
    tokens = (size // patch) ** 2 + 1
    per_block = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio) + 2 * 2 * tokens * tokens * dim
    embed = 2 * (size // patch) ** 2 * patch * patch * 3 * dim
    return depth * per_block + embed


def head_flops(n, dim, out_dim, hidden=2048, bottleneck=256):
    return 2 * n * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)


def step_flops(args):
    """Student forward+backward (3x forward) on all crops, teacher forward on the globals."""
    g = vit_flops_per_image(args.global_size, args.patch, args.dim, args.depth)
    l = vit_flops_per_image(args.local_size, args.patch, args.dim, args.depth)
    n_crops = args.n_global + args.n_local
    student = 3 * (args.n_global * g + args.n_local * l + head_flops(n_crops, args.dim, args.out_dim))
    teacher = args.n_global * g + head_flops(args.n_global, args.dim, args.out_dim)
    return (student + teacher) * args.batch


def worker(args):
    """Runs inside one backend's process; prints one JSON line."""
    import numpy as np
    import keras
    import keras_pqcl as kp

    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch = {
        "global_crops": rng.normal(
            size=(args.batch, args.n_global, args.global_size, args.global_size, 3)).astype("float32"),
        "local_crops": rng.normal(
            size=(args.batch, args.n_local, args.local_size, args.local_size, 3)).astype("float32"),
    }
    backbone = kp.backbones.VisionTransformer(
        patch_size=args.patch, embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
        image_size=args.global_size, drop_path_rate=0.1,
    )
    model = kp.models.DINO(backbone, out_dim=args.out_dim)
    model.compile(optimizer=kp.optimizers.dino_adamw(args.batch, 100, 1000), jit_compile=args.jit)

    compile_s, step_s = time_fit_steps(model, batch, args.steps)

    ema_s = time_ema(model, backend, args)
    flops = step_flops(args)
    print(json.dumps({
        "backend": backend,
        "jit": str(args.jit),
        "images_per_s": args.batch / step_s,
        "step_s": step_s,
        "compile_s": compile_s,
        "ema_share": ema_s / step_s,
        "gflops": flops / step_s / 1e9,
    }))


def time_ema(model, backend, args, repeats=5):
    """Seconds of the EMA update alone, compiled the way the train step compiles it."""
    import numpy as np

    if backend == "jax":
        import jax
        import keras

        variables = model.trainable_variables + model.non_trainable_variables
        values = [v.value for v in variables]
        teachers = [t for t, _ in model._teacher_pairs]

        @jax.jit
        def ema(values, step):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                model.update_teacher(step)
            return [scope.get_current_value(t) for t in teachers]

        fn = lambda: jax.block_until_ready(ema(values, 10))
    elif backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(lambda: model.update_teacher(tf.constant(10, "int64")),
                               jit_compile=bool(args.jit is True))
        fn = lambda: compiled()
    else:
        import torch

        def fn():
            with torch.no_grad():
                model.update_teacher(torch.tensor(10))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-local", type=int, default=6, dest="n_local")
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jit", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n_global = 2
    if args.quick:
        args.patch, args.dim, args.depth, args.heads = 8, 32, 2, 2
        args.global_size, args.local_size, args.out_dim = 32, 16, 256
    else:
        args.patch, args.dim, args.depth, args.heads = 16, 384, 12, 6
        args.global_size, args.local_size, args.out_dim = 224, 96, 65536
    if args.jit in (None, "auto"):
        args.jit = "auto"
    else:
        args.jit = args.jit == "True"

    if args.worker:
        return worker(args)

    rows = []
    configs = []
    for backend in args.backends.split(","):
        configs.append((backend, "auto"))
        if backend == "tensorflow":
            configs.append((backend, "True"))  # XLA, off by default on CPU
    for backend, jit in configs:
        row = run_worker(
            [__file__, "--worker", "--steps", str(args.steps), "--batch", str(args.batch),
             "--n-local", str(args.n_local), "--jit", jit] + (["--quick"] if args.quick else []),
            f"{backend} (jit={jit})", KERAS_BACKEND=backend)
        if row:
            rows.append(row)

    flops = step_flops(args) / args.batch / 1e9
    peak = machine_peak_gflops()
    print(f"\nDINO step: ViT(dim {args.dim}, depth {args.depth}, patch {args.patch}), batch {args.batch}, "
          f"{args.n_global}x{args.global_size} + {args.n_local}x{args.local_size}, out_dim {args.out_dim}; "
          f"{flops:.1f} GFLOP per image; fp32 matmul peak of this machine (numpy, 2048^3): {peak:.0f} GFLOP/s")
    print(f"Official PyTorch DINO code: {OFFICIAL_SHARE:.0%} of the matmul peak (issue #3); "
          f"'x official' = share / {OFFICIAL_SHARE:.0%}.")
    print("| backend | jit | images/s | step s | compile s | EMA share | GFLOP/s | % of peak | x official |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = r["gflops"] / peak
        print(f"| {r['backend']} | {r['jit']} | {r['images_per_s']:.2f} | {r['step_s']:.2f} | {r['compile_s']:.1f} | "
              f"{100 * r['ema_share']:.1f}% | {r['gflops']:.0f} | {100 * share:.0f}% | {share / OFFICIAL_SHARE:.2f} |")


# The official code's 0.66 images/s on the 2-core machine was 24% of its matmul peak;
# machines differ, so the comparison is made in shares of each machine's own peak.
OFFICIAL_SHARE = 0.24


def machine_peak_gflops(n=2048, repeats=7):
    """Best fp32 GEMM rate of this machine through NumPy's BLAS (GFLOP/s)."""
    import numpy as np

    a = np.random.default_rng(0).normal(size=(n, n)).astype("float32")
    a @ a
    best = min(_time(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
