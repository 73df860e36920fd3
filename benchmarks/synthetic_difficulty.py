"""Is ``synthetic_scenes`` hard enough that pre-training shows? Random init vs trained, k-NN and dense probes.

Issue #4 asks that a random-init backbone score clearly below a trained one on both the k-NN and
the dense probe of the embedded dataset. This script measures that claim for one recipe:

1. ``random init``: the recipe's backbone as built before training (same builder, same seed);
2. ``trained``: the recipe pre-trained with the library's runner (``keras_pqcl.pretrain``), scored
   on its transfer backbone (or ``--teacher FILE``, an existing ``*_backbone.keras``);
3. ``pixels (patch colours)``: the mean colour of each patch as the features (the image's grid of
   patch colours for k-NN). If it rivals the backbones, colour alone solves the task;
4. ``supervised ceiling`` (``--supervised N``): the same backbone trained *with labels* for N epochs
   on 4,096 further images (AdamW, ``--supervised-lr`` 3e-4, batch 64), train and validation top-1
   per epoch. What a label-trained network of this size reaches at this budget bounds what
   self-supervision can be expected to show. (At 1e-3 the tiny ViT learns slower, at 3e-3 not at
   all: 19 / 25 / 10 % validation top-1 after 8 epochs for 1e-3 / 3e-4 / 3e-3, torch, on the
   first version of the data, with a random colour pair per object.)
   ``--cnn`` adds a reference: a plain three-stage CNN (3x3 conv, BatchNorm, ReLU, max-pool; 32, 64,
   128 channels; global average pool) trained the same way. It tells whether the *data* is
   learnable at this resolution and budget, whatever the ViT does.

Probes come from :mod:`keras_pqcl.eval` (the same code as ``compare_methods.py`` and the CLI):
weighted k-NN on the CLS token (k = 20, T = 0.07) and the dense linear probe on patch tokens
(mIoU over background + 10 classes), on held-out images (probe train: seed 1, probe test: seed 2;
pre-training uses seed 0) at the recipe's global crop size.

``--layout JSON`` overrides the generator's private scene-layout knobs
(``keras_pqcl.data.synthetic._LAYOUT``: main/distractor radius, distractor count, texture
frequency, greyscale, the shared colour palette (``{"palette": 0}``: the first version's random
colours), repeated instances of the main class) for experiments on the dataset itself; the
override applies to pre-training and probes alike.
``--derive JSON`` changes recipe fields (dicts merge, as ``Recipe.derive``).

    python benchmarks/synthetic_difficulty.py --quick                          # smoke run, about a minute
    KERAS_BACKEND=torch python benchmarks/synthetic_difficulty.py --supervised 10
    python benchmarks/synthetic_difficulty.py --layout '{"palette": 4}' --derive '{"patch_size": 4}'

Prints a Markdown table and appends one JSON line per run to ``<output>/difficulty.jsonl``.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from compare_methods import evaluate, probe_splits  # noqa: E402  (same probes and held-out splits)

SUPERVISED_SEED = 3  # the probe splits use seeds 1 and 2, pre-training seed 0
SUPERVISED_IMAGES = 4096


def patch_colours(patch_size):
    """A stand-in backbone whose features are pixel statistics (the colour floor).

    ``forward_features`` returns ``patches`` = mean colour of each patch ``(B, N, 3)`` and
    ``cls`` = those colours flattened ``(B, 3 N)``, in the layout :mod:`keras_pqcl.eval` reads.
    """
    import keras
    from keras import ops

    class PatchColours(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="patch_colours")
            self.patch_size = patch_size
            self.depth = 1

        def forward_features(self, images, training=False, n_last_blocks=1, return_attention=False):
            p = self.patch_size
            pooled = ops.average_pool(images, p, strides=p, padding="valid")
            patches = ops.reshape(pooled, (ops.shape(pooled)[0], -1, 3))
            cls = ops.reshape(patches, (ops.shape(patches)[0], -1))
            # _pool reads the CLS token of the last block: pad the patches to its width.
            width = ops.shape(cls)[-1]
            padded = ops.pad(patches, ((0, 0), (0, 0), (0, width - 3)))
            tokens = ops.concatenate([cls[:, None], padded], axis=1)
            return {"cls": cls, "patches": patches, "last_blocks": [tokens]}

    return PatchColours()


def score(backbone, splits, size, args):
    """k-NN and dense scores (%, one decimal) and the seconds they took."""
    start = time.time()
    scores = evaluate(backbone, splits, size, args, linear=False)
    return dict({k: round(v, 1) for k, v in scores.items()}, seconds=round(time.time() - start))


def reference_cnn(size):
    """Image features of a plain CNN: three (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) stages, GAP."""
    import keras

    layers = [keras.Input((size, size, 3))]
    for channels in (32, 64, 128):
        layers += [
            keras.layers.Conv2D(channels, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
        ]
    return keras.Sequential(layers + [keras.layers.GlobalAveragePooling2D()], name="reference_cnn")


def supervised_data(size, test):
    """The labelled training images and the probe test split, preprocessed for ``size`` px."""
    import keras_pqcl as kp
    from keras_pqcl.eval.features import eval_preprocess

    data = kp.data.synthetic_scenes(SUPERVISED_IMAGES, image_size=test["images"].shape[1], seed=SUPERVISED_SEED)
    return {
        split: (np.asarray(eval_preprocess(d["images"], size=size)), d["labels"])
        for split, d in (("train", data), ("val", test))
    }


def supervised_ceiling(features, data, epochs, lr):
    """Train and validation top-1 (%) per epoch of ``features`` (a layer mapping images to one
    vector each) with a linear classifier on top, all trained with labels on ``data``
    (from :func:`supervised_data`)."""
    import keras

    (x, y), validation = data["train"], data["val"]
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, keras.layers.Dense(10)(features(inputs)))
    model.compile(
        keras.optimizers.AdamW(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    history = model.fit(x, y, batch_size=64, epochs=epochs, validation_data=validation, verbose=0)
    return {
        split: [round(100.0 * v, 1) for v in history.history[key]]
        for split, key in (("train", "accuracy"), ("val", "val_accuracy"))
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the recipe's)")
    parser.add_argument("--derive", default="{}", help="JSON recipe changes, e.g. '{\"patch_size\": 4}'")
    parser.add_argument("--layout", default="{}", help="JSON overrides of synthetic._LAYOUT")
    parser.add_argument("--teacher", default=None, help="evaluate this backbone instead of pre-training")
    parser.add_argument("--supervised", type=int, default=0, help="epochs of the supervised ceiling (0: skip)")
    parser.add_argument("--supervised-lr", type=float, default=3e-4, dest="supervised_lr")
    parser.add_argument("--cnn", action="store_true", help="with --supervised: also train the reference CNN")
    parser.add_argument("--probe-train", type=int, default=1000, dest="probe_train")
    parser.add_argument("--probe-test", type=int, default=500, dest="probe_test")
    parser.add_argument("--dense-epochs", type=int, default=20, dest="dense_epochs")
    parser.add_argument("--no-pixels", action="store_true", help="skip the patch-colour floor")
    parser.add_argument("--output", default=os.path.join("runs", "difficulty"))
    parser.add_argument("--quick", action="store_true", help="1 epoch of 4 steps, small probes")
    args = parser.parse_args()
    if args.cnn and not args.supervised:
        parser.error("--cnn needs --supervised N (the epochs both networks train for)")

    import keras

    import keras_pqcl as kp
    from keras_pqcl.data import synthetic
    from keras_pqcl.training import build_backbone

    layout = json.loads(args.layout)
    unknown = set(layout) - set(synthetic._LAYOUT)
    if unknown:
        raise SystemExit(f"unknown --layout keys {sorted(unknown)}; known: {sorted(synthetic._LAYOUT)}")
    synthetic._LAYOUT.update(layout)
    recipe = kp.load_recipe(args.recipe).derive(**json.loads(args.derive))
    if args.quick:
        args.probe_train, args.probe_test, args.dense_epochs = 200, 100, 3
        recipe = recipe.replace(epochs=1, steps_per_epoch=4, knn_every=0)
    elif args.epochs:
        recipe = recipe.replace(epochs=args.epochs)
    size = recipe.crops["global_size"]
    splits = probe_splits(recipe, args.probe_train, args.probe_test)

    result = {
        "recipe": recipe.name,
        "epochs": recipe.epochs,
        "layout": layout,
        "derive": json.loads(args.derive),
        "backend": keras.backend.backend(),
        "rows": {},
    }
    rows = result["rows"]
    keras.utils.set_random_seed(recipe.seed)
    rows["random init"] = score(build_backbone(recipe, size), splits, size, args)
    if not args.no_pixels:
        rows["pixels (patch colours)"] = score(patch_colours(recipe.patch_size), splits, size, args)
    if args.teacher:
        path = args.teacher
    else:
        start = time.time()
        run_dir = os.path.join(args.output, f"{recipe.name}_{int(start)}")
        summary = kp.pretrain(recipe, run_dir, verbose=0)
        path = summary["transfer_backbone"]
        result.update(
            pretrain_seconds=round(time.time() - start),
            first_loss=summary.get("first_loss"),
            last_loss=summary.get("last_loss"),
            collapse=summary.get("collapse"),
        )
    rows["trained"] = score(keras.saving.load_model(path), splits, size, args)
    if args.supervised:
        data = supervised_data(size, splits["test"])
        backbone = build_backbone(recipe, size)
        result["supervised_top1"] = supervised_ceiling(
            lambda x: backbone(x)["cls"], data, args.supervised, args.supervised_lr
        )
        if args.cnn:
            result["cnn_top1"] = supervised_ceiling(reference_cnn(size), data, args.supervised, args.supervised_lr)

    trained = f"trained = {args.teacher}" if args.teacher else f"{recipe.epochs} epochs"
    print(
        f"\nRecipe `{recipe.name}` ({trained}), layout {layout or 'default'}, "
        f"backend {result['backend']}; probes on {args.probe_train} / {args.probe_test} held-out images "
        f"at {size} px.\n"
    )
    print("| features | k-NN top-1 % | dense mIoU % | dense pixel acc. % |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['knn_top1']} | {row['dense_miou']} | {row['dense_pixel_acc']} |")
    if "first_loss" in result:
        print(
            f"\nloss {result['first_loss']:.2f} -> {result['last_loss']:.2f}"
            + (f"; collapse: {result['collapse']}" if result.get("collapse") else "")
        )
    for key, name in (("supervised_top1", "supervised ceiling"), ("cnn_top1", "reference CNN, supervised")):
        if key in result:
            print(f"{name}, top-1 % per epoch: train {result[key]['train']}, validation {result[key]['val']}")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "difficulty.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
