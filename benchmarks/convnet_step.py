"""Images/s of one DenseCL and one MCL training step (ResNet-50, 224 px, batch 32) per backend.

Each row builds its model and optimizer from the paper recipe (``recipes/densecl_resnet50.py``,
``recipes/mcl_resnet50.py``) through the recipe runner's registry, takes one batch from the
method's own pipeline (DenseCL: two MoCo-v2 views; MCL: eight views and their 2x2/4x4/8x8
montages) on ``synthetic_scenes`` images of 224 px, and times ``fit`` steps on that batch, so the
pipeline's cost is not in the number. "images/s" counts source images (the batch size), not views.

    python benchmarks/convnet_step.py                       # all backends, both methods
    python benchmarks/convnet_step.py --backends torch --steps 2
    python benchmarks/convnet_step.py --quick               # tiny ResNet at 64 px, a smoke test
"""

import json
import os
import sys

from _timing import run_rows, step_parser, time_fit_steps

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (row label, paper recipe)
ROWS = (("DenseCL", "densecl_resnet50"), ("MCL", "mcl_resnet50"))


def worker(args):
    import keras
    import numpy as np

    from keras_pqcl.recipe import load_recipe
    from keras_pqcl.training import METHODS, build_backbone, build_dataset, build_optimizer

    label, recipe_name = ROWS[args.row]
    keras.utils.set_random_seed(0)
    recipe = load_recipe(recipe_name)
    size = 224
    if args.quick:
        size = 64
        recipe = recipe.replace(backbone="resnet_tiny", backbone_args={"width": 8})
        small = (
            dict(queue_size=256)
            if label == "DenseCL"
            else dict(fpn_channels=32, neck_channels=32, projection_dim=32, predictor_hidden_dim=64)
        )
        recipe = recipe.derive(method_args=dict(hidden_dim=64, **small))
    if label == "DenseCL":
        recipe = recipe.derive(crops=dict(global_size=size), backbone_args=dict(bn_splits=1))
    else:
        recipe = recipe.derive(crops=dict(image_size=size))
    recipe = recipe.replace(data=f"synthetic_scenes:{args.batch}:{size}", batch_size=args.batch, epochs=1)
    dataset, _, _ = build_dataset(recipe)
    batch = next(iter(dataset))
    model = METHODS[recipe.method].model(recipe, build_backbone(recipe, size))
    model.compile(optimizer=build_optimizer(recipe, 1000), jit_compile="auto")
    compile_s, step_s = time_fit_steps(model, {k: np.asarray(v) for k, v in batch.items()}, args.steps)
    print(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "row": label,
                "model": "tiny ResNet" if args.quick else recipe.backbone,
                "size": size,
                "images_per_s": args.batch / step_s,
                "step_s": step_s,
                "compile_s": compile_s,
            }
        )
    )


def main():
    args = step_parser(__doc__, batch=32).parse_args()
    if args.worker:
        return worker(args)
    results = run_rows(__file__, [row[0] for row in ROWS], args)

    print(f"\nOne training step: batch {args.batch}, median of {args.steps} steps after the first.")
    print("| backend | method | backbone | px | images/s | step s | first step s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['backend']} | {r['row']} | {r['model']} | {r['size']} | {r['images_per_s']:.2f} | "
            f"{r['step_s']:.2f} | {r['compile_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
