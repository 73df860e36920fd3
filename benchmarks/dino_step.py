"""Images/s of one DINO training step per Keras backend, on synthetic crops.

Default setting (issue #3): ViT-S/16, batch 8, 2 x 224 + 6 x 96 crops, out_dim 65536, the full
trainer (clipping, centering, schedules, EMA). Each backend runs in its own subprocess; the
table gives images/s, the first step (compile) time, the share of the step spent in the
teacher EMA and the estimated GFLOP/s.

With ``--reference PATH`` (a folder holding the official DINO code and its
``time_official_step.py``), the official PyTorch step is timed with the same settings in a
subprocess before and after our rows, and each row gets "x official": our images/s over the
mean of the two official runs of this invocation. That is the only comparison with the
official code this script makes; numbers from other runs or machines are never mixed in.

    python benchmarks/dino_step.py --reference ../shared/refs/dino_official   # side by side
    python benchmarks/dino_step.py --backends jax --steps 5
    python benchmarks/dino_step.py --quick --backends torch --reference PATH # smoke test (vit_tiny, 32 px)

Shared machines are noisy: compare ratios measured in one invocation.
"""

import argparse
import json
import sys

from _official import ARCHS, Bracket, check_reference, machine
from _peak import peak_gflops
from _subprocess import run_worker
from _timing import median_seconds, print_table, step_backbone, time_fit_steps


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
        "global_crops": rng.normal(size=(args.batch, args.n_global, args.global_size, args.global_size, 3)).astype(
            "float32"
        ),
        "local_crops": rng.normal(size=(args.batch, args.n_local, args.local_size, args.local_size, 3)).astype(
            "float32"
        ),
    }
    backbone = step_backbone(args)
    model = kp.models.DINO(backbone, out_dim=args.out_dim)
    model.compile(optimizer=kp.optimizers.dino_adamw(args.batch, 100, 1000), jit_compile=args.jit)

    compile_s, step_s = time_fit_steps(model, batch, args.steps)

    ema_s = time_ema(model, backend, args)
    flops = step_flops(args)
    print(
        json.dumps(
            {
                "backend": backend,
                "jit": str(args.jit),
                "images_per_s": args.batch / step_s,
                "step_s": step_s,
                "compile_s": compile_s,
                "ema_share": ema_s / step_s,
                "gflops": flops / step_s / 1e9,
            }
        )
    )


def time_ema(model, backend, args, repeats=5):
    """Seconds of the EMA update alone, compiled the way the train step compiles it."""

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

        compiled = tf.function(
            lambda: model.update_teacher(tf.constant(10, "int64")), jit_compile=bool(args.jit is True)
        )
        fn = lambda: compiled()
    else:
        import torch

        def fn():
            with torch.no_grad():
                model.update_teacher(torch.tensor(10))

    return median_seconds(fn, repeats)


def configure(args):
    """Model and crop settings from the command line (shared by the driver and its workers)."""
    args.n_global = 2
    if args.quick:
        if not args.worker:  # a worker gets the driver's choice through --arch
            # With --reference the official script needs one of its presets: its smallest, vit_tiny.
            args.arch = "vit_tiny" if args.reference else "toy"
        args.patch, args.global_size, args.local_size, args.out_dim = 8, 32, 16, 256
    else:
        args.patch, args.global_size, args.local_size, args.out_dim = 16, 224, 96, 65536
    args.dim, args.depth, args.heads = ARCHS.get(args.arch, (32, 2, 2))
    if args.jit in (None, "auto"):
        args.jit = "auto"
    else:
        args.jit = args.jit == "True"


def official_settings(args):
    return dict(
        arch=args.arch,
        patch=args.patch,
        batch=args.batch,
        global_size=args.global_size,
        local_size=args.local_size,
        locals=args.n_local,
        out_dim=args.out_dim,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-local", type=int, default=6, dest="n_local")
    parser.add_argument(
        "--arch",
        default="vit_small",
        choices=sorted(ARCHS) + ["toy"],
        help="ViT preset (the official script's names; toy: dim 32, depth 2, heads 2); --quick overrides it",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and crops (smoke test); vit_tiny at 32 px with --reference"
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="PATH",
        help="a checkout of the official DINO code holding time_official_step.py: "
        "its step is timed before and after ours, and each row gets 'x official'",
    )
    parser.add_argument(
        "--no-peak",
        action="store_true",
        dest="no_peak",
        help="skip the torch fp32 matmul peak (and the 'share of peak' column)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jit", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure(args)
    if args.worker:
        return worker(args)

    bracket = None
    if args.reference:
        bracket = Bracket(check_reference(args.reference), args.steps)
        bracket.before([official_settings(args)])

    rows = []
    configs = []
    for backend in args.backends.split(","):
        configs.append((backend, "auto"))
        if backend == "tensorflow":
            configs.append((backend, "True"))  # XLA, off by default on CPU
    for backend, jit in configs:
        row = run_worker(
            [
                __file__,
                "--worker",
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--n-local",
                str(args.n_local),
                "--jit",
                jit,
                "--arch",
                args.arch,
            ]
            + (["--quick"] if args.quick else []),
            f"{backend} (jit={jit})",
            KERAS_BACKEND=backend,
        )
        if row:
            rows.append(row)
            print(f"  {backend} (jit={jit}): {row['images_per_s']:.3f} images/s", file=sys.stderr, flush=True)

    # Between our rows and the official run after them, so that it sees the same machine.
    peak = None if args.no_peak else peak_gflops()
    official = None
    if bracket:
        bracket.after()
        official = bracket.images_per_s(official_settings(args))

    model = f"{args.arch} (dim {args.dim}, depth {args.depth}, heads {args.heads}), patch {args.patch}"
    flops = step_flops(args) / args.batch / 1e9
    print(f"\n### DINO training step, {machine()}\n")
    print(
        f"- settings: {model}, batch {args.batch}, {args.n_global}x{args.global_size} + "
        f"{args.n_local}x{args.local_size} crops, out_dim {args.out_dim}, median of {args.steps} steps "
        f"after the first; {flops:.2f} GFLOP per image (estimate)"
    )
    if bracket:
        print("\n".join(bracket.describe()))
        print(
            "- ratios are within this invocation: 'x official' = our images/s / the official images/s "
            "(mean of its runs before and after ours)"
        )
    else:
        print(
            "- no --reference given: no official run, no 'x official' column; compare ratios within one invocation only"
        )
    if peak:
        print(
            f"- peak: {peak['gflops']:.1f} GFLOP/s, this machine's fp32 matmul peak as torch measures it "
            f"({peak['threads']} threads, best GEMM {peak['shape']}), in this invocation; 'share of peak' = "
            "a row's GFLOP/s over it. No fp32 step can pass 100 %."
        )
        if official:
            need = 2 * official * flops / peak["gflops"]
            print(
                f"- 2x the official step would need {2 * official * flops:.1f} GFLOP/s, {100 * need:.0f} % of the peak"
            )
    print()
    columns = ["backend", "jit", "images/s", "step s", "compile s", "EMA share", "GFLOP/s"]
    columns += ["share of peak"] if peak else []
    columns += ["x official"] if bracket else []
    cells = []
    for r in rows:
        cells.append(
            [
                r["backend"],
                str(r["jit"]),
                f"{r['images_per_s']:.3f}",
                f"{r['step_s']:.3f}",
                f"{r['compile_s']:.1f}",
                f"{100 * r['ema_share']:.1f}%",
                f"{r['gflops']:.1f}",
            ]
        )
        if peak:
            cells[-1].append(f"{100 * r['gflops'] / peak['gflops']:.0f}%")
        if bracket:
            cells[-1].append(f"{r['images_per_s'] / official:.2f}" if official else "n/a")
    if official:
        # The official step as a row of its own, with the same FLOP estimate.
        cells.append(["official DINO (torch)", "-", f"{official:.3f}", f"{args.batch / official:.3f}", "-", "-"])
        cells[-1].append(f"{official * flops:.1f}")
        if peak:
            cells[-1].append(f"{100 * official * flops / peak['gflops']:.0f}%")
        cells[-1].append("1.00")
    print_table(columns, cells)


if __name__ == "__main__":
    main()
