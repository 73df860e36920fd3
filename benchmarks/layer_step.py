"""Forward + backward time of the ViT-S layers alone, per Keras backend, in one invocation.

Where a backend's training step loses time to another's, this table says which layer does it.
Each layer runs on the tokens of the student's global crops in a batch-8 DINO step: ``(16, 197,
384)``, ViT-S/16 sizes (6 heads, MLP 1536, exact GELU). The timed function is the gradient of
``sum(y * y)`` with respect to the layer's weights and its input, compiled the way a train step
compiles it (``jax.jit``; ``tf.function``, with and without XLA; torch eager). Rows:

- ``gemm``: one ``Dense(1536)`` without bias or activation, the MLP's first matmul;
- ``mlp``, ``attention``, ``layer_norm``, ``block``: the library's layers
  (``keras_pqcl.layers``), ``block`` being one whole pre-norm transformer block.

Each backend runs in its own process; "x torch" is a row's time over torch's in this run.

    python benchmarks/layer_step.py
    python benchmarks/layer_step.py --backends jax,torch --repeats 9
    python benchmarks/layer_step.py --quick      # small shapes (smoke test)
"""

import argparse
import json
import sys

from _official import machine
from _subprocess import run_worker
from _timing import median_seconds, print_table

ROWS = ("gemm", "mlp", "attention", "layer_norm", "block")


def make_layer(name, dim, heads):
    import keras

    from keras_pqcl.layers import Attention, Block, Mlp

    return {
        "gemm": lambda: keras.layers.Dense(4 * dim, use_bias=False),
        "mlp": lambda: Mlp(dim, 4 * dim),
        "attention": lambda: Attention(dim, heads),
        "layer_norm": lambda: keras.layers.LayerNormalization(epsilon=1e-6),
        "block": lambda: Block(dim, heads),
    }[name]()


def gradient_fn(layer, x, backend, xla):
    """A no-argument function that computes the gradients once and waits for them."""
    from keras import ops

    def loss_of(y):
        y = y[0] if isinstance(y, (tuple, list)) else y
        return ops.sum(y * y)

    if backend == "jax":
        import jax

        weights = [v.value for v in layer.trainable_variables]
        state = [v.value for v in layer.non_trainable_variables]

        def loss(weights, x):
            y, _ = layer.stateless_call(weights, state, x)
            return loss_of(y)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: jax.block_until_ready(grad(weights, x))
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)

        @tf.function(jit_compile=xla)
        def grad():
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = loss_of(layer(x))
            return tape.gradient(value, [x, *layer.trainable_variables])

        return lambda: [g.numpy() for g in grad()]
    import torch

    x = torch.tensor(x, requires_grad=True)

    def grad():
        layer.zero_grad()
        x.grad = None
        loss_of(layer(x)).backward()

    return grad


def worker(args):
    import keras
    import numpy as np

    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(args.batch, args.tokens, args.dim)).astype("float32")
    results = {}
    for name in ROWS:
        layer = make_layer(name, args.dim, args.heads)
        layer(x[:1])
        results[name] = 1e3 * median_seconds(gradient_fn(layer, x, backend, args.xla), args.repeats, warmup=2)
    print(json.dumps({"backend": backend, "xla": args.xla, "ms": results}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per layer after two untimed ones")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xla", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch, args.tokens, args.dim, args.heads = (2, 17, 32, 2) if args.quick else (16, 197, 384, 6)
    if args.worker:
        return worker(args)
    unknown = sorted(set(args.backends.split(",")) - {"tensorflow", "jax", "torch"})
    if unknown:
        parser.error(f"--backends {','.join(unknown)}: choose from tensorflow,jax,torch")

    results = []
    for backend in args.backends.split(","):
        for xla in (False, True) if backend == "tensorflow" else (False,):
            label = f"{backend}{' (XLA)' if xla else ''}"
            out = run_worker(
                [__file__, "--worker", "--repeats", str(args.repeats)]
                + (["--quick"] if args.quick else [])
                + (["--xla"] if xla else []),
                label,
                timeout=1800,
                KERAS_BACKEND=backend,
            )
            if out:
                results.append((label, out["ms"]))
                print(f"  {label}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out["ms"].items()), file=sys.stderr)
    if not results:
        sys.exit("layer_step: no backend ran (see the errors above)")
    torch_ms = dict(results).get("torch")
    print(f"\n### Layer forward + backward, {machine()}\n")
    print(
        f"- input ({args.batch}, {args.tokens}, {args.dim}), {args.heads} heads; median of {args.repeats} runs "
        "after two; ms per gradient of sum(y * y) with respect to the weights and the input"
    )
    print("- 'x torch' = the row's time over torch's in this invocation\n")
    columns = ["layer"] + [label for label, _ in results]
    columns += [f"{label} x torch" for label, _ in results if torch_ms and label != "torch"]
    cells = []
    for name in ROWS:
        row = [f"`{name}`"] + [f"{ms[name]:.1f}" for _, ms in results]
        row += [f"{ms[name] / torch_ms[name]:.2f}" for label, ms in results if torch_ms and label != "torch"]
        cells.append(row)
    print_table(columns, cells)


if __name__ == "__main__":
    main()
