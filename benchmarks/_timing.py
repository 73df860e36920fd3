"""Step timing shared by the step benchmarks."""

import time

import numpy as np


def time_fit_steps(model, batch, steps, dataset=None, warmup=1):
    """``(first_step_s, median_step_s)`` of ``model.fit`` on ``batch`` repeated: the median
    of ``steps`` steps after ``warmup`` untimed ones.

    The first step includes tracing/compilation. A callback that reads the loss makes Keras
    sync the logs to host, so the time between batch begin and end is the whole step.
    ``dataset``: an endless dataset to feed instead of ``batch`` repeated (e.g. a
    per-worker dataset under ``MultiWorkerMirroredStrategy``).
    """
    import keras
    import tensorflow as tf

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            # A (1,) vector under MultiWorkerMirroredStrategy (see backend._TensorFlowTrainStep).
            float(np.asarray(logs["loss"]).reshape(-1)[0])
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    if dataset is None:
        dataset = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=steps + warmup, verbose=0, callbacks=[timer])
    return timer.times[0], float(np.median(timer.times[warmup:]))


def median_seconds(fn, repeats, warmup=1):
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def xla_step_flops(model, batch):
    """FLOPs of one ``model.train_step`` on ``batch`` as XLA counts them (JAX backend only).

    The step is lowered, not run: ``cost_analysis()`` of the traced HLO counts every
    operation of the step (matmuls, element-wise, softmax, optimizer, EMA), so it is the
    same figure for every backend that runs the same model. ``model`` must be compiled.
    """
    import jax

    # What fit() does with the first batch: build the model and its optimizer (lowering needs both).
    model._symbolic_build(data_batch=batch)
    groups = (model.trainable_variables, model.non_trainable_variables, model.optimizer.variables)
    state = tuple([v.value for v in group] for group in (*groups, model.metrics_variables))
    return float(jax.jit(model.train_step).lower(state, batch).cost_analysis()["flops"])


def step_parser(doc, batch):
    """The command line shared by the step benchmarks (backends, rows, steps, batch, quick)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def selected_rows(args, labels):
    """The row numbers chosen with ``--rows`` (default: all)."""
    return [int(r) for r in args.rows.split(",")] if args.rows else list(range(len(labels)))


def run_rows(script, labels, args, extra=()):
    """Each selected row on each backend, each in its own process (``extra``: more worker
    arguments); the workers' JSON results, with ``"index"`` set to the row number."""
    import sys

    from _subprocess import run_worker

    rows = selected_rows(args, labels)
    results = []
    for backend in args.backends.split(","):
        for i in rows:
            result = run_worker(
                [script, "--worker", "--row", str(i), "--steps", str(args.steps), "--batch", str(args.batch)]
                + (["--quick"] if args.quick else [])
                + list(extra),
                f"{labels[i]} on {backend}",
                KERAS_BACKEND=backend,
            )
            if result:
                result["index"] = i
                results.append(result)
                print(f"  {backend:10s} {result['row']:24s} {result['images_per_s']:.2f} images/s", file=sys.stderr)
    return results


def print_table(columns, rows):
    """Print a Markdown table: the header of ``columns``, then one line per row of cells (str)."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def step_backbone(args, drop_path_rate=0.1):
    """The benchmarks' ViT of ``args`` (``patch``, ``dim``, ``depth``, ``heads``, ``global_size``)."""
    import keras_pqcl as kp

    return kp.backbones.VisionTransformer(
        patch_size=args.patch,
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        image_size=args.global_size,
        drop_path_rate=drop_path_rate,
    )
