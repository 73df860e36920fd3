"""Is ``synthetic_scenes`` hard enough that pre-training shows? k-NN and dense probes, random vs trained.

The embedded dataset is meant to be "hard enough that a random-init backbone scores clearly below
a trained one on both k-NN and dense probes". This script checks that claim end to end:

1. pre-trains the ``tiny`` recipe with the library's own runner (``keras_pqcl.pretrain``);
2. builds a random-init backbone exactly as the recipe does (same builder, same seed);
3. extracts frozen features of both on held-out ``synthetic_scenes`` splits generated with seeds
   the pre-training never saw (probe train: seed 1, probe test: seed 2; pre-training always uses
   seed 0), preprocessed like the pipeline's global crops but without augmentation: [0, 1],
   bicubic resize of the whole image to the global crop size, mean/std normalisation;
4. scores them with
   * a weighted k-NN on the CLS token (DINO protocol: L2-normalised features, cosine similarity,
     k = 20, votes ``exp(sim / 0.07)``), top-1 accuracy on the scene label;
   * a dense linear probe: one softmax classifier on frozen, standardised patch tokens, trained
     with L-BFGS to predict the majority mask class under each patch (background included, so
     ``num_classes + 1`` classes); patch accuracy and mIoU on the test split;
5. adds pixel floors computed from the same normalised input: the mean RGB of each patch (colour
   alone; for k-NN the grid of patch means, which contains the image mean) and the raw pixels of
   each patch / image. If these rival the backbones, the dataset is solvable without learning
   shape or texture and the comparison says little.

It prints a Markdown table and writes it to ``<output>/difficulty.md``.

    python benchmarks/synthetic_difficulty.py --quick            # smoke run, about a minute
    KERAS_BACKEND=torch python benchmarks/synthetic_difficulty.py --output runs/difficulty
    python benchmarks/synthetic_difficulty.py --teacher runs/tiny/teacher_backbone.keras

``--no-pixels`` drops the two pixel-floor rows (sweeps over recipes); the table ends with the
run's first/last loss and last teacher entropy from ``log.csv``, so a collapsed run shows.
``--teacher`` skips pre-training and evaluates an existing ``teacher_backbone.keras`` (the
recipe still defines the random-init backbone and the preprocessing). Works on any Keras backend.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    # Lets the script run from a checkout that was not `pip install`ed.
    sys.path.insert(0, ROOT)

PROBE_TRAIN_SEED = 1
PROBE_TEST_SEED = 2
KNN_K = 20
KNN_TEMPERATURE = 0.07


# ----------------------------------------------------------------------------- data
def synthetic_spec(recipe):
    """``(num_images, image_size)`` of the recipe's ``synthetic_scenes[:N[:S]]`` data."""
    from keras_pqcl.data import sources

    data = recipe.data
    if not isinstance(data, str) or not (data == "synthetic_scenes" or data.startswith("synthetic_scenes:")):
        raise SystemExit(f"This benchmark needs a synthetic_scenes recipe; {recipe.name!r} uses {data!r}.")
    parts = data.split(":")
    num = int(parts[1]) if len(parts) > 1 else sources.SYNTHETIC_DEFAULT_NUM
    size = int(parts[2]) if len(parts) > 2 else sources.SYNTHETIC_DEFAULT_SIZE
    return num, size


def preprocess(images, size, mean, std, antialias):
    """uint8 ``[N, S, S, 3]`` -> float32 ``[N, size, size, 3]``, as a whole-image global crop.

    Same order as ``MultiCrop``: resize, scale to [0, 1], clip (bicubic overshoots), normalise.
    """
    import tensorflow as tf

    out = []
    for start in range(0, len(images), 512):
        x = tf.image.resize(images[start:start + 512], (size, size), method="bicubic", antialias=antialias)
        out.append(np.clip(x.numpy() / 255.0, 0.0, 1.0))
    x = np.concatenate(out).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def patch_targets(masks, grid, patch_size, crop_size, num_values):
    """Majority mask value (0 = background, class + 1 otherwise) under each patch: ``[N, grid * grid]``."""
    n, s = masks.shape[:2]
    if s % grid:
        # The crop is a plain resize of the whole image, so a nearest resize of the mask to the
        # crop size keeps every patch aligned with the pixels it sees.
        idx = (np.arange(crop_size) * s) // crop_size
        masks = masks[:, idx][:, :, idx]
        block = patch_size
    else:
        block = s // grid
    blocks = masks.reshape(n, grid, block, grid, block)
    counts = np.stack([(blocks == v).sum(axis=(2, 4)) for v in range(num_values)], axis=-1)
    # argmax breaks ties towards the lower value, i.e. towards background.
    return counts.argmax(-1).reshape(n, grid * grid)


# ------------------------------------------------------------------------- features
def no_grad():
    import keras

    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def backbone_features(backbone, images, batch_size=128):
    """Frozen ``(cls [N, D], patches [N, P, D])`` of ``images`` in inference mode."""
    from keras import ops

    cls, patches = [], []
    with no_grad():
        for start in range(0, len(images), batch_size):
            x = ops.convert_to_tensor(images[start:start + batch_size])
            out = backbone.forward_features(x, training=False)
            cls.append(np.asarray(ops.convert_to_numpy(out["cls"]), np.float32))
            patches.append(np.asarray(ops.convert_to_numpy(out["patches"]), np.float32))
    return np.concatenate(cls), np.concatenate(patches)


def pixel_features(images, patch_size, kind):
    """Pixel features of the normalised crops: ``(image [N, F], patches [N, P, F])``."""
    n, h, w, c = images.shape
    g = h // patch_size
    blocks = images.reshape(n, g, patch_size, g, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
    if kind == "mean_rgb":
        patches = blocks.mean(axis=(3, 4)).reshape(n, g * g, c)
    else:
        patches = blocks.reshape(n, g * g, patch_size * patch_size * c)
    # Taken after mean/std normalisation, which roughly centres the colours: cosine k-NN on raw
    # positive RGB values would call nearly every pair of images similar.
    image = patches.reshape(n, -1)
    return image, patches


# --------------------------------------------------------------------------- probes
def knn_top1(train_x, train_y, test_x, test_y, num_classes, k=KNN_K, temperature=KNN_TEMPERATURE,
             batch_size=256):
    """DINO's weighted k-NN: top-1 accuracy (%) of ``sum exp(sim / T)`` votes over the top k."""
    def l2n(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    train_x, test_x = l2n(train_x.astype(np.float32)), l2n(test_x.astype(np.float32))
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(test_x), batch_size):
        sim = test_x[start:start + batch_size] @ train_x.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, axis=1)
        weights = np.exp(top_sim / temperature)
        votes = np.zeros((len(sim), num_classes), np.float64)
        np.add.at(votes, (np.arange(len(sim))[:, None], train_y[top]), weights)
        correct += int((votes.argmax(1) == test_y[start:start + batch_size]).sum())
    return 100.0 * correct / len(test_x)


def linear_probe(train_x, train_y, test_x, num_classes, weight_decay=1e-4, max_iter=500):
    """Multinomial logistic regression by L-BFGS on standardised features; test predictions."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = np.concatenate([(train_x - mean) / std, np.ones((len(train_x), 1))], axis=1).astype(np.float64)
    xt = np.concatenate([(test_x - mean) / std, np.ones((len(test_x), 1))], axis=1).astype(np.float64)
    n, d = x.shape
    onehot = np.eye(num_classes)[train_y]

    def loss_and_grad(flat):
        w = flat.reshape(d, num_classes)
        logits = x @ w
        lse = logsumexp(logits, axis=1, keepdims=True)
        loss = float((lse[:, 0] - (logits * onehot).sum(1)).mean())
        grad = x.T @ (np.exp(logits - lse) - onehot) / n
        # The bias row is not decayed.
        loss += 0.5 * weight_decay * float((w[:-1] ** 2).sum())
        grad[:-1] += weight_decay * w[:-1]
        return loss, grad.ravel()

    result = minimize(loss_and_grad, np.zeros(d * num_classes), jac=True, method="L-BFGS-B",
                      options=dict(maxiter=max_iter))
    return (xt @ result.x.reshape(d, num_classes)).argmax(1)


def dense_scores(pred, target, num_classes):
    """Patch accuracy (%) and mIoU (%) over the classes present in the target or the prediction."""
    confusion = np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    return 100.0 * tp.sum() / confusion.sum(), 100.0 * iou.mean()


def evaluate(name, train, test, num_classes):
    """One table row: k-NN on image features, dense probe on patch features."""
    (train_img, train_patch), (test_img, test_patch) = train["features"], test["features"]
    knn = knn_top1(train_img, train["labels"], test_img, test["labels"], num_classes)
    d = train_patch.shape[-1]
    dense_classes = num_classes + 1
    pred = linear_probe(train_patch.reshape(-1, d), train["targets"].reshape(-1),
                        test_patch.reshape(-1, d), dense_classes)
    acc, miou = dense_scores(pred, test["targets"].reshape(-1), dense_classes)
    return dict(name=name, knn=knn, dense_acc=acc, dense_miou=miou)


# --------------------------------------------------------------------------- report
def markdown(rows, meta):
    lines = [
        f"synthetic_scenes difficulty: recipe `{meta['recipe']}`, backend {meta['backend']}, "
        f"pre-trained {meta['epochs']} epochs on {meta['train_images']} images (seed 0); probes: "
        f"{meta['probe_train']} train (seed {PROBE_TRAIN_SEED}) / {meta['probe_test']} test "
        f"(seed {PROBE_TEST_SEED}) images of {meta['image_size']} px resized to {meta['crop_size']} px, "
        f"{meta['grid']}x{meta['grid']} patches, {meta['num_classes'] + 1} dense classes.",
        "",
        "| features | k-NN top-1 (%) | dense patch acc. (%) | dense mIoU (%) | pre-training |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cost = f"{r['pretrain_seconds']:.0f} s" if r.get("pretrain_seconds") is not None else "-"
        lines.append(f"| {r['name']} | {r['knn']:.1f} | {r['dense_acc']:.1f} | {r['dense_miou']:.1f} | {cost} |")
    random, trained = rows[0], rows[1]
    lines += [
        "",
        f"Pre-trained minus random-init: k-NN {trained['knn'] - random['knn']:+.1f} points, dense accuracy "
        f"{trained['dense_acc'] - random['dense_acc']:+.1f}, mIoU {trained['dense_miou'] - random['dense_miou']:+.1f}.",
        f"Chance: k-NN {100.0 / meta['num_classes']:.1f} % (uniform over {meta['num_classes']} "
        f"classes); dense: predicting background everywhere gives {meta['bg_acc']:.1f} % accuracy.",
    ]
    if meta.get("log"):
        log = meta["log"]
        lines.append(
            f"Pre-training log: loss {log['first_loss']:.2f} -> {log['last_loss']:.2f}, teacher entropy "
            f"{log['last_entropy']:.2f} nats (ln K = {log['ln_k']:.2f}; near ln K with the loss near ln K "
            "is uniform collapse, near 0 one-prototype collapse)."
        )
    return "\n".join(lines) + "\n"


def training_log(run_dir, recipe):
    """First/last loss and last teacher entropy from the run's ``log.csv`` (None if absent)."""
    import math

    from keras_pqcl.training import read_log

    log = read_log(os.path.join(run_dir, "log.csv"))
    out_dim = recipe.method_args.get("out_dim")
    if not log.get("loss") or not log.get("teacher_entropy") or not out_dim:
        return None
    return dict(first_loss=log["loss"][0], last_loss=log["loss"][-1],
                last_entropy=log["teacher_entropy"][-1], ln_k=math.log(out_dim))


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="tiny", help="recipe name or .py path (default: tiny)")
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the recipe's)")
    p.add_argument("--train-images", type=int, default=None,
                   help="pre-training images (default: the recipe's synthetic_scenes:N)")
    p.add_argument("--probe-train", type=int, default=2048, help="probe train images (seed 1)")
    p.add_argument("--probe-test", type=int, default=512, help="probe test images (seed 2)")
    p.add_argument("--output", default=None, help="output folder (default: a new temp folder)")
    p.add_argument("--teacher", default=None,
                   help="evaluate this teacher_backbone.keras instead of pre-training")
    p.add_argument("--seed", type=int, default=None, help="recipe seed: weights and data order")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 epochs on 256 images, probes on 256 / 128 images")
    p.add_argument("--verbose", type=int, default=2, help="fit verbosity (0, 1, 2)")
    p.add_argument("--no-pixels", action="store_true", help="skip the pixel-floor rows (faster sweeps)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = args.epochs or 2
        args.train_images = args.train_images or 256
        args.probe_train, args.probe_test = min(args.probe_train, 256), min(args.probe_test, 128)
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras

    import keras_pqcl as kp
    from keras_pqcl.training import build_backbone

    wall = time.time()
    recipe = kp.load_recipe(args.recipe)
    _, size = synthetic_spec(recipe)
    recipe = recipe.replace(
        epochs=args.epochs,
        seed=args.seed,
        data=f"synthetic_scenes:{args.train_images}:{size}" if args.train_images else None,
    )
    num, size = synthetic_spec(recipe)
    output = args.output or tempfile.mkdtemp(prefix="synthetic_difficulty_")
    os.makedirs(output, exist_ok=True)

    crops = kp.data.MultiCropConfig(**recipe.crops)
    crop_size, patch = crops.global_size, recipe.patch_size
    grid = crop_size // patch
    mean = getattr(crops, "mean", kp.data.IMAGENET_MEAN)
    std = getattr(crops, "std", kp.data.IMAGENET_STD)
    antialias = bool(getattr(crops, "antialias", False))

    if args.teacher:
        teacher_path = args.teacher
        # The run's own records say how it was trained; the command-line recipe may differ.
        run_dir = os.path.dirname(os.path.abspath(teacher_path))
        pretrain_seconds, epochs = float("nan"), recipe.epochs
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            with open(os.path.join(run_dir, "summary.json")) as f:
                run = json.load(f)
            pretrain_seconds, epochs = run.get("seconds", pretrain_seconds), run.get("epochs", epochs)
        if os.path.exists(os.path.join(run_dir, "recipe.json")):
            with open(os.path.join(run_dir, "recipe.json")) as f:
                num = synthetic_spec(recipe.replace(data=json.load(f)["data"]))[0]
        recipe = recipe.replace(epochs=epochs)
        print(f"Evaluating {teacher_path} (no pre-training).")
    else:
        print(f"Pre-training {recipe.name}: {recipe.epochs} epochs on {recipe.data} -> {output}")
        summary = kp.pretrain(recipe, output, verbose=args.verbose)
        teacher_path, pretrain_seconds = summary["teacher_backbone"], summary["seconds"]

    # Same builder, same seed: `pretrain` seeds, builds the data pipeline (which draws no global
    # random numbers) and then this backbone, so these are exactly the weights the student and
    # teacher started from.
    keras.utils.set_random_seed(recipe.seed)
    random_backbone = build_backbone(recipe, crop_size)
    teacher = keras.saving.load_model(teacher_path)

    num_classes = 10
    splits = {}
    for split, n, seed in (("train", args.probe_train, PROBE_TRAIN_SEED),
                           ("test", args.probe_test, PROBE_TEST_SEED)):
        data = kp.data.synthetic_scenes(n, image_size=size, num_classes=num_classes, seed=seed)
        images = preprocess(data["images"], crop_size, mean, std, antialias)
        splits[split] = dict(
            images=images,
            labels=np.asarray(data["labels"], np.int64),
            targets=patch_targets(np.asarray(data["masks"]), grid, patch, crop_size, num_classes + 1),
        )

    feature_sets = [
        ("random-init ViT", lambda s: backbone_features(random_backbone, s["images"])),
        ("pre-trained ViT (teacher)", lambda s: backbone_features(teacher, s["images"])),
        ("pixels: mean RGB per patch", lambda s: pixel_features(s["images"], patch, "mean_rgb")),
        ("pixels: raw patch / image", lambda s: pixel_features(s["images"], patch, "raw")),
    ]
    if args.no_pixels:
        feature_sets = feature_sets[:2]
    rows = []
    for name, extract in feature_sets:
        start = time.time()
        for s in splits.values():
            s["features"] = extract(s)
        row = evaluate(name, splits["train"], splits["test"], num_classes)
        row["pretrain_seconds"] = pretrain_seconds if name.startswith("pre-trained") else None
        rows.append(row)
        print(f"  {name}: k-NN {row['knn']:.1f}, dense acc {row['dense_acc']:.1f}, "
              f"mIoU {row['dense_miou']:.1f} ({time.time() - start:.0f} s)")

    meta = dict(
        recipe=recipe.name, backend=keras.backend.backend(), epochs=recipe.epochs, train_images=num,
        probe_train=args.probe_train, probe_test=args.probe_test,
        image_size=size, crop_size=crop_size, grid=grid, num_classes=num_classes,
        bg_acc=100.0 * float((splits["test"]["targets"] == 0).mean()),
    )
    meta["log"] = training_log(os.path.dirname(os.path.abspath(teacher_path)), recipe)
    table = markdown(rows, meta)
    with open(os.path.join(output, "difficulty.md"), "w") as f:
        f.write(table)
    with open(os.path.join(output, "difficulty.json"), "w") as f:
        json.dump(dict(meta, rows=rows, wall_seconds=round(time.time() - wall, 1)), f, indent=2)
    print()
    print(table)
    print(f"Wrote {os.path.join(output, 'difficulty.md')}; total {time.time() - wall:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
