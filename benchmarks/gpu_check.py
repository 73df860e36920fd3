"""GPU check: per backend, is the GPU seen, and what do a DINO and an iBOT+PQCL step cost.

Run through ``benchmarks/gpu_check.sh`` (one call, at most 8 minutes on one H200):

* per backend, the devices it sees (a GPU must be among them, unless ``--cpu-smoke``);
* a ViT-S/16 DINO step (2 x 224 + 10 x 96 crops, K = 65536, the DINO recipe otherwise) and
  an iBOT+PQCL step (its paper recipe: 2 x 224 + 1 x 96 crops, masks and queries), batch 64,
  in ``float32`` and ``mixed_bfloat16``: images/s, first (compile) step, peak GPU memory;
* a Markdown table at the end.

Each (backend, method, precision) runs in its own process, so each peak memory is its own
and nothing compiled leaks between rows; a row that fails or outlives its share of the time
budget is reported as such and the check goes on. TensorFlow steps are XLA-compiled on a
GPU (``jit_compile=True``); JAX always compiles; torch runs eagerly (Keras' default).

``--cpu-smoke`` runs the same code paths on the CPU with a tiny ViT (patch 8, 32 px) and
batch 4, so that CI keeps the script alive: per backend one process, which reports its
devices and runs DINO in float32 and iBOT+PQCL in mixed_bfloat16 (both methods, both
precisions, half the compilations). Peak memory is then "n/a" (no GPU).

    bash benchmarks/gpu_check.sh                              # on the GPU machine
    bash benchmarks/gpu_check.sh --cpu-smoke --backends jax   # here
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# (label, paper recipe, local crops (None: the recipe's))
METHODS = {
    "dino": ("DINO", "dino_vit_small", 10),
    "pqcl": ("iBOT+PQCL", "pqcl_vit_small", None),
}
PRECISIONS = ("float32", "mixed_bfloat16")


def recipe_of(method, smoke):
    from keras_pqcl.recipe import load_recipe

    _, name, n_local = METHODS[method]
    recipe = load_recipe(name)
    if n_local is not None:
        recipe = recipe.derive(crops=dict(n_local=n_local))
    if smoke:
        head = dict(out_dim=256, hidden_dim=64, bottleneck_dim=32)
        if "patch_out_dim" in recipe.method_args:
            head["patch_out_dim"] = 256
        recipe = recipe.derive(
            patch_size=8,
            method_args=head,
            crops=dict(global_size=32, local_size=16, n_local=2),
            backbone_args=dict(embed_dim=32, depth=2, num_heads=2),
        )
    return recipe


def devices():
    """``(names of the devices the backend sees, whether one is a GPU)``."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        names = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
    elif backend == "tensorflow":
        import tensorflow as tf

        names = [d.name for d in tf.config.list_logical_devices()]
    else:
        import torch

        names = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return names, any(("gpu" in n.lower() or "cuda" in n.lower()) for n in names)


def reset_peak_memory():
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")


def peak_memory_gib():
    """Peak GPU memory of this process since :func:`reset_peak_memory` (JAX: since start), or
    None without a GPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_logical_devices("GPU"):
            return None
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu":
        return None
    return (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30


def run_config(method, precision, args, on_gpu):
    import keras
    import numpy as np
    from method_step import make_batch
    from _timing import time_fit_steps

    from keras_pqcl import optimizers
    from keras_pqcl.training import METHODS as RUNNERS
    from keras_pqcl.training import build_backbone

    keras.mixed_precision.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    reset_peak_memory()
    recipe = recipe_of(method, args.cpu_smoke)
    backbone = build_backbone(recipe, recipe.crops["global_size"])
    model = RUNNERS[recipe.method].model(recipe, backbone)
    # XLA for TensorFlow on a GPU; elsewhere Keras' choice.
    jit = True if (on_gpu and keras.backend.backend() == "tensorflow") else "auto"
    model.compile(optimizer=optimizers.dino_adamw(args.batch, 100, 1000), jit_compile=jit)
    batch = make_batch(recipe, args.batch, np.random.default_rng(0))
    first_s, step_s = time_fit_steps(model, batch, args.steps)
    crops = recipe.crops
    return {
        "method": METHODS[method][0],
        "precision": precision,
        "crops": f"2x{crops['global_size']} + {crops['n_local']}x{crops['local_size']}",
        "out_dim": recipe.method_args["out_dim"],
        "jit": str(jit),
        "images_per_s": args.batch / step_s,
        "step_s": step_s,
        "first_step_s": first_s,
        "peak_gib": peak_memory_gib(),
    }


def worker(args):
    """Inside one backend's process: the devices, then each requested config; one JSON line."""
    import keras

    names, on_gpu = devices()
    out = {"backend": keras.backend.backend(), "devices": names, "gpu": on_gpu, "rows": []}
    if args.probe:
        print(json.dumps(out))
        return
    for config in args.configs.split(","):
        method, precision = config.split(":")
        out["rows"].append(run_config(method, precision, args, on_gpu))
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument(
        "--cpu-smoke", action="store_true", dest="cpu_smoke", help="tiny model, batch 4, on the CPU (CI)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 64 (4 with --cpu-smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the first (default 5; 1 smoke)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        dest="budget_s",
        help="wall-clock budget of the whole check; rows past it are skipped",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (4 if args.cpu_smoke else 64)
    args.steps = args.steps or (1 if args.cpu_smoke else 5)
    if args.worker:
        return worker(args)
    return drive(args)


def drive(args):
    from _official import machine
    from _subprocess import run_worker
    from _timing import print_table

    start = time.monotonic()
    left = lambda: args.budget_s - (time.monotonic() - start)  # noqa: E731
    if args.cpu_smoke:
        configs = ["dino:float32", "pqcl:mixed_bfloat16"]
    else:
        configs = [f"{m}:{p}" for m in METHODS for p in PRECISIONS]
    common = ["--batch", str(args.batch), "--steps", str(args.steps)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    env = dict(CUDA_VISIBLE_DEVICES="") if args.cpu_smoke else {}
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    backends = args.backends.split(",")
    seen, rows, failed = {}, [], []
    for b, backend in enumerate(backends):
        if not args.cpu_smoke:
            # Fails fast, before any model is built, where the backend sees no GPU.
            probe = run_worker(
                [__file__, "--worker", "--probe", *common],
                f"{backend}: device probe",
                timeout=max(left(), 1),
                KERAS_BACKEND=backend,
                **env,
            )
            seen[backend] = probe
            if probe is None:
                failed.append(f"{backend}: the device probe failed")
                continue
            print(f"{backend}: devices {probe['devices']}", file=sys.stderr, flush=True)
            if not probe["gpu"]:
                failed.append(f"{backend}: no GPU seen")
                continue
        # One process per config on the GPU (a peak memory each), one for all in the smoke test.
        groups = [configs] if args.cpu_smoke else [[c] for c in configs]
        for g, group in enumerate(groups):
            # This group's share of what is left, over what remains to run on every backend.
            remaining = (len(groups) - g) + len(groups) * (len(backends) - b - 1)
            share = left() / remaining
            if share < 5:
                failed.append(f"{backend} {','.join(group)}: skipped (time budget)")
                continue
            result = run_worker(
                [__file__, "--worker", "--configs", ",".join(group), *common],
                f"{backend} {','.join(group)}",
                timeout=share,
                KERAS_BACKEND=backend,
                **env,
            )
            if result is None:
                failed.append(f"{backend} {','.join(group)}: failed or stopped (see above)")
                continue
            seen.setdefault(backend, result)
            for row in result["rows"]:
                row["backend"] = backend
                rows.append(row)
                print(
                    f"  {backend} {row['method']} {row['precision']}: {row['images_per_s']:.2f} images/s",
                    file=sys.stderr,
                    flush=True,
                )

    print(f"\n### GPU check, {machine()}\n")
    model = "tiny ViT/8 (dim 32, depth 2), --cpu-smoke" if args.cpu_smoke else "ViT-S/16"
    print(
        f"- {model}, batch {args.batch}, median of {args.steps} steps after the first; "
        f"{time.monotonic() - start:.0f} s in all"
    )
    for backend in backends:
        probe = seen.get(backend)
        print(f"- {backend}: " + (", ".join(probe["devices"]) if probe else "probe failed"))
    for line in failed:
        print(f"- NOT RUN: {line}")
    print()
    columns = [
        "backend",
        "method",
        "crops",
        "K",
        "precision",
        "jit",
        "images/s",
        "step s",
        "first step s",
        "peak GPU GiB",
    ]
    print_table(
        columns,
        [
            [
                r["backend"],
                r["method"],
                r["crops"],
                str(r["out_dim"]),
                r["precision"],
                r["jit"],
                f"{r['images_per_s']:.2f}",
                f"{r['step_s']:.3f}",
                f"{r['first_step_s']:.1f}",
                "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
            ]
            for r in rows
        ],
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
