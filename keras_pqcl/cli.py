"""``keras-pqcl`` command line.

    keras-pqcl pretrain --recipe tiny --output runs/tiny
    keras-pqcl pretrain --recipe dino_vit_small --data /path/to/images --epochs 100 --batch-size 64
    keras-pqcl pretrain --recipe tiny --output runs/tiny --resume
    keras-pqcl recipes

The Keras backend is taken from ``KERAS_BACKEND`` or ``--backend``.
"""

import argparse
import os
import sys


def _parser():
    parser = argparse.ArgumentParser(prog="keras-pqcl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pre-train a backbone with a recipe")
    pre.add_argument("--recipe", default="tiny", help="recipe name (see `keras-pqcl recipes`) or path to a .py file")
    pre.add_argument("--data", help="data source: synthetic_scenes[:N], an image folder, or tfds:NAME[/config]")
    pre.add_argument("--epochs", type=int)
    pre.add_argument("--batch-size", type=int, dest="batch_size", help="global batch size")
    pre.add_argument("--steps-per-epoch", type=int, dest="steps_per_epoch", help="cap steps per epoch")
    pre.add_argument("--output", default=None, help="output folder (default runs/<recipe>)")
    pre.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    pre.add_argument("--precision", choices=["float32", "mixed_bfloat16"])
    pre.add_argument("--seed", type=int)
    pre.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")

    rec = sub.add_parser("recipes", help="list the available recipes")
    rec.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help=argparse.SUPPRESS)
    return parser


def _use_backend(backend):
    """Re-run this command under ``backend`` if Keras was already imported with another."""
    if not backend:
        return
    import keras

    if keras.backend.backend() != backend:
        os.environ["KERAS_BACKEND"] = backend
        os.execv(sys.executable, [sys.executable, "-m", "keras_pqcl.cli", *sys.argv[1:]])


def main(argv=None):
    try:
        return _main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        # Bad input or a diverged run: the message says what to change, a traceback adds noise.
        print(f"keras-pqcl: error: {error}", file=sys.stderr)
        return 2


def _main(argv):
    args = _parser().parse_args(argv)
    _use_backend(getattr(args, "backend", None))
    from keras_pqcl.recipe import available_recipes, load_recipe

    if args.command == "recipes":
        for name in available_recipes():
            print(f"{name:20s} {load_recipe(name).description}")
        return 0

    recipe = load_recipe(args.recipe).replace(
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        precision=args.precision,
        seed=args.seed,
    )
    output = args.output or os.path.join("runs", recipe.name)

    import keras

    from keras_pqcl.training import pretrain

    print(f"keras-pqcl: recipe {recipe.name!r} ({recipe.method}, {recipe.backbone}/{recipe.patch_size}) "
          f"on backend {keras.backend.backend()}, {recipe.epochs} epochs, batch {recipe.batch_size}, "
          f"data {recipe.data!r} -> {output}")
    summary = pretrain(recipe, output, resume=args.resume, verbose=0 if args.quiet else 1)
    print("\nDone.")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:{width}s}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
